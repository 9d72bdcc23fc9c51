"""``diffattn demo``: the embedded tiny Wan pipeline, made sparse, writes a video.

The embedded pipeline has random weights (a real MiniLM text encoder): its frames are coloured
noise. It shows the whole mechanism — prompt encoding, guidance, denoising through diffattn's
sparse self-attention, decoding, writing — on any machine in seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_PROMPT = "a red fox running through fresh snow at sunrise"
DEMO_PATTERN = "window:3x5x5"


def _versions() -> dict:
    from .generate import versions

    return versions()


def run_demo(out_dir, pattern_spec: str = DEMO_PATTERN, prompt: str = DEMO_PROMPT, seed: int = 0,
             dense_steps: int = 2, steps: int | None = None, impl: str = "auto", progress: bool = True,
             log=print) -> dict:
    """Generate one video with the embedded pipeline and a sparse pattern; returns the JSON record.
    ``progress``: show the denoising progress bar."""
    import torch

    from .generate import Method, quiet_transformers, all_dense_record, check_writable, guarded_record, run_once
    from .integration import Schedule
    from .integration import apply
    from .patterns import parse_pattern
    from .pipelines import EMBEDDED_DEFAULTS, build_embedded_wan_pipeline
    from .video import write_png_grid, write_video

    pattern = parse_pattern(pattern_spec)
    settings = EMBEDDED_DEFAULTS.call_kwargs(**({"num_inference_steps": steps} if steps else {}))
    if dense_steps < 0:
        raise ValueError(f"dense_steps must be >= 0, got {dense_steps}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a folder")
    check_writable(out_dir)
    method = Method(pattern_spec, pattern_spec, pattern, Schedule(dense_steps=dense_steps))
    all_dense_record(method, settings.get("num_inference_steps"), [], log)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    log("building the embedded demo pipeline (tiny Wan, random weights, real MiniLM text encoder)...")
    t0 = time.perf_counter()
    with quiet_transformers():
        pipe = build_embedded_wan_pipeline(seed=seed, device=device)
    build_s = time.perf_counter() - t0
    handle = apply(pipe, pattern, dense_steps=dense_steps, impl=impl)
    log(f"{handle}")
    result = run_once(pipe, prompt, seed, settings, device=device, progress=progress)
    frames, layout = result.frames, result.layout
    generate_s = result.timings["generate"]

    paths = {
        "mp4": write_video(frames, out_dir / "demo.mp4"),
        "gif": write_video(frames, out_dir / "demo.gif"),
        "png": write_png_grid(frames, out_dir / "demo-frames.png"),
    }
    record = {
        "note": "embedded demonstration pipeline: random DiT and VAE weights, so the frames are noise",
        "prompt": prompt,
        "seed": seed,
        "pattern": pattern_spec,
        "pattern_repr": repr(pattern),
        "dense_steps": dense_steps,
        **guarded_record([
            ("layout", lambda: {"token_grid": list(layout.grid) if layout else None,
                                "attended_fraction": pattern.attended_fraction(layout) if layout else None}),
            ("schedule", lambda: all_dense_record(method, settings.get("num_inference_steps"), [])),
        ], log),
        "settings": settings,
        "device": device,
        "timings_s": {"build": round(build_s, 3), "generate": round(generate_s, 3),
                      **{k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v])
                         for k, v in result.timings.items() if k != "generate"}},
        "versions": _versions(),
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=1))
    log(f"wrote {paths['mp4']}, {paths['gif']}, {paths['png']} and {out_dir / 'demo.json'} "
        f"({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, generated in {generate_s:.1f} s)")
    return record
