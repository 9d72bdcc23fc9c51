"""Time of FreeSwim's high-resolution denoising pass on a full-size random-weight Wan 2.1 1.3B
transformer (CUDA): dense attention, the inward window alone, window + full branch reused between
guide steps (FreeSwim's default, every 2 steps) and window + full branch at every step (no reuse).

    python3 benchmarks/highres_bench.py --out highres-h100.json
    python3 benchmarks/highres_bench.py --size 1920x1088 --frames 81 --steps 4 --out highres-1080p.json

Each configuration runs one untimed warm-up step (kernel compilation) and then ``--steps``
denoising steps of the high-resolution pass with classifier-free guidance (a prompt pass and a
negative-prompt pass per step), on random latents and random text embeddings (512 tokens x 4096,
as UMT5 gives). Every step is timed with CUDA synchronisation. The JSON holds each step's time,
the mean time of guide steps (full branch computed) and of the other steps, the peak GPU memory,
the bytes of the recorded cross-attention outputs, and ``pass_s_computed``: the time of a whole
pass of ``--pass-steps`` steps (FreeSwim: 50 x strength 0.7 = 35) computed from those means
(guide steps at 0, k, 2k, ...). Only the transformer calls and the scheduler step are timed
(no VAE, no text encoder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time

import torch

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, eps=1e-6, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
TINY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, in_channels=16, out_channels=16,
            text_dim=64, freq_dim=16, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
#: (label, attention, guide_every)
CONFIGS = (("dense", "dense", None), ("window", "window", None), ("freeswim k=2", "freeswim", 2),
           ("freeswim k=1 (no reuse)", "freeswim", 1))


def _size(text: str) -> tuple[int, int]:
    width, height = (int(x) for x in text.lower().split("x"))
    return width, height


def environment() -> dict:
    import diffusers
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "diffusers": diffusers.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(model, attention: str, guide_every, *, window, scale_factor, latents_shape, text, negative, steps,
               device, impl) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffattn import SlidingWindow
    from diffattn.integration.dual_path import DualPath

    dual = None
    if attention != "dense":
        dual = DualPath.install(model, SlidingWindow((None, *window)), guide_every=guide_every,
                                scale_factor=scale_factor, impl=impl)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=9.0)
    scheduler.set_timesteps(steps + 1, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(latents_shape, generator=generator, device=device, dtype=torch.float32)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                x = latents.to(model.dtype)
                ts = t.expand(1)

                def call(embeds):
                    return model(hidden_states=x, timestep=ts, encoder_hidden_states=embeds, return_dict=False)[0]

                _sync(device)
                t0 = time.perf_counter()
                # Step 0 is the warm-up: a guide step, so both branches compile; timed steps count from 1.
                step = max(i - 1, 0) if i else 0
                cond = call(text) if dual is None else dual.conditional(lambda: call(text), step)
                uncond = call(negative) if dual is None else dual.unconditional(lambda: call(negative))
                noise = uncond + 5.0 * (cond - uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                _sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
                if i == 0 and dual is not None:
                    dual.reset()
        result = {"step_s": times, "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                                        if device.type == "cuda" else None),
                  "finite": bool(torch.isfinite(latents).all())}
        if dual is not None:
            result["dual_path"] = dual.record()
            result["guide_steps"] = [step for step, _ in dual.guide_steps]
        else:
            result["guide_steps"] = []
    finally:
        if dual is not None:
            dual.remove()
    return result


def pass_seconds(step_s: list, guide_steps: list, guide_every, pass_steps: int) -> dict:
    """Means of guide and other steps, and a whole pass computed from them."""
    guide = [t for s, t in enumerate(step_s) if s in guide_steps]
    other = [t for s, t in enumerate(step_s) if s not in guide_steps]
    out = {"guide_step_mean_s": statistics.mean(guide) if guide else None,
           "other_step_mean_s": statistics.mean(other) if other else None}
    if guide_every is None:
        n_guide = 0
    else:
        n_guide = len(range(0, pass_steps, guide_every))
    n_other = pass_steps - n_guide
    if (n_guide and not guide) or (n_other and not other):
        out["pass_s_computed"] = None
    else:
        out["pass_s_computed"] = n_guide * (out["guide_step_mean_s"] or 0) + n_other * (out["other_step_mean_s"] or 0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--native", type=_size, default=(832, 480), help="native size WxH, default 832x480")
    parser.add_argument("--size", type=_size, default=(1248, 720),
                        help="high-resolution size WxH, default 1248x720 (1.5x the native)")
    parser.add_argument("--frames", type=int, default=81, help="frames (4k + 1), default 81")
    parser.add_argument("--steps", type=int, default=4, help="timed denoising steps per configuration, default 4")
    parser.add_argument("--pass-steps", type=int, default=35, help="steps of a whole pass (50 x strength 0.7)")
    parser.add_argument("--configs", nargs="*", help="labels to run (default: all): " + ", ".join(c[0] for c in CONFIGS))
    parser.add_argument("--impl", default="auto", choices=["auto", "triton", "reference"])
    parser.add_argument("--tiny", action="store_true", help="a tiny random transformer (checks the script, no GPU needed)")
    args = parser.parse_args(argv)

    from diffusers import WanTransformer3DModel

    from diffattn.pipelines.highres import default_scale_factor, default_window

    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny to check the script)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY if args.tiny else WAN_1_3B
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device).eval()
    if dtype != torch.float32:  # as from_pretrained(torch_dtype=...) loads it: rope, norms, time embedder stay fp32
        from diffattn.pipelines.embedded import _cast_like_from_pretrained

        _cast_like_from_pretrained(model, dtype)
    lat_frames = (args.frames - 1) // 4 + 1
    grid = lambda w, h: (lat_frames, h // 16, w // 16)  # noqa: E731 - 8x VAE, 2x2 patches
    native, target = grid(*args.native), grid(*args.size)
    window = default_window(native, target)
    scale = default_scale_factor(native)
    g = torch.Generator(device=device).manual_seed(1)
    text = torch.randn(1, 512, config["text_dim"], generator=g, device=device, dtype=dtype)
    negative = torch.randn(1, 512, config["text_dim"], generator=g, device=device, dtype=dtype)
    latents_shape = (1, config["in_channels"], lat_frames, args.size[1] // 8, args.size[0] // 8)
    from diffattn import SlidingWindow, TokenLayout

    density = float(SlidingWindow((None, *window)).attended_fraction(TokenLayout(target)))
    record = {"benchmark": "FreeSwim high-resolution denoising pass", "environment": environment(),
              "model": "WanTransformer3DModel, Wan 2.1 1.3B shapes, random weights" if not args.tiny else "tiny",
              "dtype": str(dtype).replace("torch.", ""), "native": list(args.native), "size": list(args.size),
              "frames": args.frames, "native_grid": list(native), "token_grid": list(target),
              "tokens": math.prod(target), "window": [None, *window], "window_attended_fraction": density,
              "scale_factor": scale, "timed_steps": args.steps, "pass_steps": args.pass_steps, "impl": args.impl,
              "guidance": "classifier-free, 2 transformer calls per step (+1 full-branch call on guide steps)",
              "results": []}
    print(f"grid {target} ({math.prod(target)} tokens), window {window} ({density:.1%} of pairs), scale {scale:.4f}")
    for label, attention, guide_every in CONFIGS:
        if args.configs and label not in args.configs:
            continue
        result = run_config(model, attention, guide_every, window=window, scale_factor=scale,
                            latents_shape=latents_shape, text=text, negative=negative, steps=args.steps,
                            device=device, impl=args.impl)
        result.update(pass_seconds(result["step_s"], result["guide_steps"], guide_every, args.pass_steps))
        result = {"config": label, "attention": attention, "guide_every": guide_every, **result}
        record["results"].append(result)
        print(f"{label:>24}: steps {[round(t, 3) for t in result['step_s']]} s, "
              f"pass ({args.pass_steps} steps) {result['pass_s_computed']:.1f} s")
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    dense = next((r for r in record["results"] if r["config"] == "dense"), None)
    if dense is not None:
        for r in record["results"]:
            r["speedup_vs_dense"] = dense["pass_s_computed"] / r["pass_s_computed"]
    no_reuse = next((r for r in record["results"] if r["guide_every"] == 1), None)
    if no_reuse is not None:
        for r in record["results"]:
            if r["attention"] == "freeswim":
                r["speedup_vs_no_reuse"] = no_reuse["pass_s_computed"] / r["pass_s_computed"]
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
