"""Sparse attention in a Wan 2.1 / 2.2 pipeline, two ways.

    python samples/wan_sparse.py                                   # the embedded tiny demo pipeline
    python samples/wan_sparse.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers   # a real checkpoint (GPU)
"""

import argparse

import torch

import diffattn
from diffattn.video import write_video

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="local folder or hub id of a Wan diffusers pipeline; default: the embedded demo")
parser.add_argument("--out", default="wan-sparse.mp4")
args = parser.parse_args()

if args.model:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda")
    settings = dict(height=480, width=832, num_frames=81, num_inference_steps=50)
    pattern = diffattn.Radial(decay=0.2)  # Radial Attention's Wan setting
    schedule = dict(dense_steps=12, dense_layers=1)
else:
    from diffattn.pipelines import EMBEDDED_DEFAULTS, build_embedded_wan_pipeline

    pipe = build_embedded_wan_pipeline()
    settings = EMBEDDED_DEFAULTS.call_kwargs()
    pattern = diffattn.SlidingWindow((3, 5, 5))
    schedule = dict(dense_steps=2)

# 1. diffattn.apply: installs sparse self-attention processors and the generation-state hook.
handle = diffattn.apply(pipe, pattern, **schedule)
print(handle)
video = pipe("a red fox running through fresh snow", output_type="np", **settings).frames[0]
write_video(video, args.out)
print("wrote", args.out)

# 2. Back to diffusers' own processors (outputs bit-identical to before apply).
diffattn.remove(pipe)

# Installing processors directly with pipe.transformer.set_attn_processor(...) needs the
# generation-state hook too (it supplies the token grid and the step index); diffattn.apply
# is the supported way to get both.
