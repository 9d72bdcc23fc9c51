"""Training-free high-resolution Wan video (FreeSwim): 480x832 generated natively, then refined
at 1088x1872 with the inward window and the cached full-attention branch.

    python samples/highres_wan.py [--model Wan-AI/Wan2.1-T2V-1.3B-Diffusers] [--out fox-1080p.mp4]
    python samples/highres_wan.py --embedded --out fox-highres.mp4     # CPU, tiny embedded model: the mechanics

The real checkpoint needs a GPU (about 16 GB of cross-attention cache at this size in bfloat16;
``--offload`` keeps it in CPU memory instead).
"""

import argparse
import json

import torch

from diffattn.pipelines import HighResConfig, generate_highres
from diffattn.video import write_video


def load(args):
    if args.embedded:
        from diffattn.pipelines import build_embedded_wan_pipeline

        settings = dict(height=128, width=128, num_frames=9, num_inference_steps=8, max_sequence_length=64)
        return build_embedded_wan_pipeline(), settings
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    pipe.vae.enable_tiling()  # the VAE at 1088x1872 x 81 frames does not fit untiled
    return pipe, dict(height=480, width=832, num_frames=81, num_inference_steps=50)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="local folder or hub id")
    parser.add_argument("--embedded", action="store_true", help="the embedded tiny pipeline (CPU; trained on coloured shapes at 256x256: the mechanics, not quality)")
    parser.add_argument("--prompt", default="a red fox running through fresh snow at sunrise, fine fur detail")
    parser.add_argument("--upscale", type=float, default=2.25, help="factor of the native size, default 2.25")
    parser.add_argument("--guide-every", type=int, default=2, help="full branch every k steps (FreeSwim: 2)")
    parser.add_argument("--offload", action="store_true", help="keep the cross-attention cache in CPU memory")
    parser.add_argument("--out", default="fox-highres.mp4")
    args = parser.parse_args()

    pipe, settings = load(args)
    # FreeSwim's defaults: strength 0.7, window 2*(n//2)+1 native tokens, scale sqrt(log 2s / log s), shift 9.
    config = HighResConfig(guide_every=args.guide_every, offload=args.offload,
                           store_dtype=torch.bfloat16 if not args.embedded else None)
    result = generate_highres(pipe, args.prompt, upscale=args.upscale, config=config, log=print, **settings)
    write_video(result.frames, args.out, fps=16)
    write_video(result.base_frames, args.out.replace(".mp4", "-base.mp4"), fps=16)
    print(json.dumps({k: result.record[k] for k in ("highres", "timings_s")}, indent=1, default=str))
    print(f"wrote {args.out} ({result.frames.shape[2]}x{result.frames.shape[1]}, {result.frames.shape[0]} frames)")


if __name__ == "__main__":
    main()
