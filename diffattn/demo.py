"""``diffattn demo``: the embedded tiny Wan pipeline, made sparse, writes a video.

The embedded pipeline's DiT and VAE were trained on clips of coloured shapes (and its text encoder
is the real MiniLM): for a prompt such as "a red circle moving right" it draws that object in
that colour moving that way (the shapes rough), 17 frames of 256 x 256. The demo runs the
whole mechanism — prompt encoding, guidance, denoising through diffattn's sparse self-attention,
decoding, writing — on any machine in seconds. ``random_weights=True`` (``--random-weights``) uses random weights instead:
the same mechanics, but the frames are noise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_PROMPT = "a red circle moving right"
#: Piecewise with a quarter of the key blocks exact and the rest approximated. On the embedded model
#: local windows lose the asked motion (it places and moves objects through attention across the
#: whole grid: benchmarks/results/embedded-quality.md), Piecewise keeps it.
DEMO_PATTERN = "piecewise:0.25"


def _versions() -> dict:
    from .generate import versions

    return versions()


def _check(frames, prompt: str, log) -> dict | None:
    """What the shapes detector sees in the frames (None for a prompt outside the training grammar)."""
    from .pipelines.shapes_data import check_prompt

    result = check_prompt(frames, prompt)
    if result["ok"] is None:
        log("note: the embedded model was trained on prompts like 'a red circle moving right'; this prompt is "
            "outside that grammar, so expect shapes of its training world at best")
        return None
    for obj in result["objects"]:
        seen = (f"{obj['color']} found, moving {obj['motion']}" if obj["motion"] not in (None, "still")
                else f"{obj['color']} found, standing still" if obj["motion"] == "still"
                else f"{obj['color']} found, no clear motion" if obj["color_present"] else f"no {obj['color']} found")
        log(f"detector: {seen} (asked: {obj['asked']})")
    return result


def run_demo(out_dir, pattern_spec: str = DEMO_PATTERN, prompt: str = DEMO_PROMPT, seed: int = 0,
             dense_steps: int = 2, steps: int | None = None, impl: str = "auto", progress: bool = True,
             log=print, random_weights: bool = False) -> dict:
    """Generate one video with the embedded pipeline and a sparse pattern; returns the JSON record.
    ``progress``: show the denoising progress bar. ``random_weights``: random DiT and VAE weights
    seeded with ``seed`` (the frames are noise) instead of the trained ones."""
    import torch

    from .generate import (EMBEDDED_NOTE, EMBEDDED_RANDOM_NOTE, Method, all_dense_record, check_writable,
                           guarded_record, quiet_transformers, run_once)
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

    weights = "random weights" if random_weights else "trained on clips of coloured shapes"
    log(f"building the embedded demo pipeline (tiny Wan, {weights}, real MiniLM text encoder)...")
    t0 = time.perf_counter()
    with quiet_transformers():
        pipe = build_embedded_wan_pipeline(seed=seed, device=device, random_weights=random_weights)
    build_s = time.perf_counter() - t0
    handle = apply(pipe, pattern, dense_steps=dense_steps, impl=impl)
    log(f"{handle}")
    result = run_once(pipe, prompt, seed, settings, device=device, progress=progress)
    frames, layout = result.frames, result.layout
    generate_s = result.timings["generate"]

    check = _check(frames, prompt, log) if not random_weights else None
    paths = {
        "mp4": write_video(frames, out_dir / "demo.mp4"),
        "gif": write_video(frames, out_dir / "demo.gif"),
        "png": write_png_grid(frames, out_dir / "demo-frames.png"),
    }
    record = {
        "note": EMBEDDED_RANDOM_NOTE if random_weights else EMBEDDED_NOTE,
        "random_weights": random_weights,
        "prompt": prompt,
        "seed": seed,
        "pattern": pattern_spec,
        "pattern_repr": repr(pattern),
        "dense_steps": dense_steps,
        "prompt_check": check,
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
