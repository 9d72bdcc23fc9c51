"""Any supported family with diffattn sparse attention, two ways (needs the checkpoint and a GPU).

    python samples/sparse_pipeline.py --family flux [--model black-forest-labs/FLUX.1-dev] [--out flux.png]

The per-family scripts (samples/wan.py, flux.py, ...) run this with their family's defaults.
"""

import argparse

import torch

import diffattn
from diffattn.pipelines import load_pipeline
from diffattn.presets import load_preset
from diffattn.video import write_video

FAMILIES = {  # family: (preset, checkpoint, output)
    "wan": ("wan-radial", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan.mp4"),
    "hunyuan_video": ("hunyuan_video-radial", "hunyuanvideo-community/HunyuanVideo", "hunyuan_video.mp4"),
    "cogvideox": ("cogvideox-window", "THUDM/CogVideoX-5b", "cogvideox.mp4"),
    "ltx": ("ltx-window", "Lightricks/LTX-Video", "ltx.mp4"),
    "flux": ("flux-window", "black-forest-labs/FLUX.1-dev", "flux.png"),
    "sd3": ("sd3-window", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3.png"),
}


def main(family: str | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), default=family, required=family is None)
    parser.add_argument("--model", help="local folder or hub id (default: the family's checkpoint)")
    parser.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
    parser.add_argument("--out", help="output file (default: <family>.mp4 or .png)")
    args = parser.parse_args()
    preset_name, checkpoint, default_out = FAMILIES[args.family]
    out = args.out or default_out

    # 1. The family's preset (the settings its paper used; see configs/<preset>.yaml) through
    #    load_pipeline, which loads the checkpoint and calls diffattn.apply.
    preset = load_preset(preset_name)
    pipe, handle = load_pipeline(args.model or checkpoint, preset, torch_dtype=torch.bfloat16, device="cuda")
    print(handle)
    generator = torch.Generator("cuda").manual_seed(0)
    if out.endswith(".png"):
        pipe(args.prompt, generator=generator, **preset.call_kwargs()).images[0].save(out)
    else:
        write_video(pipe(args.prompt, generator=generator, output_type="np", **preset.call_kwargs()).frames[0], out)
    print("wrote", out, "with", preset.build_pattern())

    # 2. The same processors installed directly with set_attn_processor; remove() undoes it.
    diffattn.remove(pipe)
    pipe.transformer.set_attn_processor(diffattn.sparse_processors(
        pipe.transformer, preset.build_pattern(), dense_steps=preset.schedule.dense_steps,
        dense_layers=preset.schedule.dense_layers, scheduler=pipe.scheduler))
    diffattn.remove(pipe.transformer)


if __name__ == "__main__":
    main()
