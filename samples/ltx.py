"""LTX-Video with diffattn sparse attention, two ways (needs the checkpoint and a GPU).

    python samples/ltx.py [--model Lightricks/LTX-Video] [--out ltx.mp4]
"""

import argparse

import torch

import diffattn
from diffattn.pipelines import load_pipeline
from diffattn.presets import load_preset
from diffattn.video import write_video

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Lightricks/LTX-Video", help="local folder or hub id")
parser.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
parser.add_argument("--out", default="ltx.mp4")
args = parser.parse_args()

# 1. A preset (ltx-window: the settings its paper used, see configs/ltx-window.yaml) via load_pipeline,
#    which calls diffattn.apply on the loaded pipeline.
preset = load_preset("ltx-window")
pipe, handle = load_pipeline(args.model, preset, torch_dtype=torch.bfloat16, device="cuda")
print(handle)
result = pipe(args.prompt, generator=torch.Generator("cuda").manual_seed(0), output_type="np", **preset.call_kwargs())
write_video(result.frames[0], args.out)
print("wrote", args.out, "with", preset.pattern)

# 2. The same processors installed directly with set_attn_processor.
diffattn.remove(pipe)
pipe.transformer.set_attn_processor(
    diffattn.sparse_processors(pipe.transformer, preset.build_pattern(), dense_steps=preset.schedule.dense_steps,
                               dense_layers=preset.schedule.dense_layers, scheduler=pipe.scheduler)
)
diffattn.remove(pipe.transformer)  # diffusers' own processors again
