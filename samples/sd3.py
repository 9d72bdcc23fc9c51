"""Stable Diffusion 3 / 3.5 with diffattn sparse attention, two ways (needs the checkpoint and a GPU).

    python samples/sd3.py [--model stabilityai/stable-diffusion-3-medium-diffusers] [--out sd3.png]
"""

import argparse

import torch

import diffattn
from diffattn.pipelines import load_pipeline
from diffattn.presets import load_preset

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="stabilityai/stable-diffusion-3-medium-diffusers", help="local folder or hub id")
parser.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
parser.add_argument("--out", default="sd3.png")
args = parser.parse_args()

# 1. A preset (sd3-window: the settings its paper used, see configs/sd3-window.yaml) via load_pipeline,
#    which calls diffattn.apply on the loaded pipeline.
preset = load_preset("sd3-window")
pipe, handle = load_pipeline(args.model, preset, torch_dtype=torch.bfloat16, device="cuda")
print(handle)
result = pipe(args.prompt, generator=torch.Generator("cuda").manual_seed(0), **preset.call_kwargs())
result.images[0].save(args.out)
print("wrote", args.out, "with", preset.pattern)

# 2. The same processors installed directly with set_attn_processor.
diffattn.remove(pipe)
pipe.transformer.set_attn_processor(
    diffattn.sparse_processors(pipe.transformer, preset.build_pattern(), dense_steps=preset.schedule.dense_steps,
                               dense_layers=preset.schedule.dense_layers, scheduler=pipe.scheduler)
)
diffattn.remove(pipe.transformer)  # diffusers' own processors again
