"""Wan text-to-video on N GPUs: diffusers' Ulysses context parallelism with diffattn's sparse attention.

    torchrun --nproc-per-node 2 samples/multi_gpu_wan.py [--model Wan-AI/Wan2.1-T2V-14B-Diffusers] [--out wan.mp4]
    torchrun --nproc-per-node 2 samples/multi_gpu_wan.py --embedded    # the tiny embedded Wan, no checkpoint

Every rank loads the same pipeline and runs it with the same prompt and seed; diffusers splits the
tokens over the ranks, and in every attention layer each rank attends the whole sequence for H/N
heads (sparse, with the preset's pattern). Only rank 0 writes the video. Needs one GPU per rank.
"""

import argparse
import os

import torch

from diffattn.integration.parallel import enable_ulysses, init_distributed, ulysses_bytes_per_layer
from diffattn.pipelines import EMBEDDED_DEFAULTS, load_pipeline
from diffattn.presets import load_preset
from diffattn.video import write_video


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-14B-Diffusers", help="local folder or hub id")
    parser.add_argument("--embedded", action="store_true", help="the tiny embedded Wan (trained on clips of coloured shapes; no checkpoint needed)")
    parser.add_argument("--preset", default="wan-radial")
    parser.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
    parser.add_argument("--out", default="wan.mp4")
    args = parser.parse_args()

    # 1. Join torchrun's process group: one process per GPU, the Ulysses degree is their number.
    degree = int(os.environ.get("WORLD_SIZE", "1"))
    info = init_distributed(degree)

    # 2. Load the pipeline on this rank's GPU with the preset's sparse attention (diffattn.apply).
    preset = load_preset(args.preset)
    model = None if args.embedded else args.model
    dtype = torch.float32 if args.embedded else torch.bfloat16
    pipe, handle = load_pipeline(model, preset, torch_dtype=dtype, device=info.device)

    # 3. Ulysses over all ranks: every transformer gets diffusers' enable_parallelism.
    enable_ulysses(pipe, degree)
    if info.is_main:
        print(handle, f"ulysses degree {degree}")

    # 4. The same call on every rank (same seed: the initial latents must agree).
    settings = EMBEDDED_DEFAULTS.call_kwargs() if args.embedded else preset.call_kwargs()
    generator = torch.Generator(info.device).manual_seed(0)
    seen = {}  # the token layout diffattn read from the transformer's (global) inputs

    def remember_layout(pipeline, step, timestep, callback_kwargs):
        seen["layout"] = handle.states["transformer"].layout
        return {}

    frames = pipe(args.prompt, generator=generator, output_type="np", callback_on_step_end=remember_layout,
                  **settings).frames[0]

    if info.is_main:
        write_video(frames, args.out)
        layout = seen["layout"]
        config = pipe.transformer.config
        traffic = ulysses_bytes_per_layer(layout.seq_len, config.num_attention_heads, config.attention_head_dim,
                                          degree, dtype_bytes=torch.finfo(dtype).bits // 8)
        print(f"wrote {args.out}; {layout.seq_len} tokens: each rank sent {traffic.per_rank_sent / 2**20:.1f} MiB "
              f"per self-attention layer and transformer call ({traffic.all_to_alls} all-to-alls)")
    if degree > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
