"""``diffattn generate --upscale FACTOR``: FreeSwim's training-free high resolution per prompt,
written as a video with a JSON record of both passes (settings, token grids, timings, cache bytes)."""

from __future__ import annotations

import math
from typing import Callable

from .generate import (OutputPlan, Target, UserError, _round_timings, frames_record, versions,
                       write_outputs)

__all__ = ["generate_highres_outputs"]

#: ``generate_highres`` keyword arguments taken from the generation settings when present.
_BASE_KEYS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
              "max_sequence_length")


def _rounded(timings: dict) -> dict:
    return {key: _rounded(value) if isinstance(value, dict) else value for key, value in _round_timings(timings).items()}


def generate_highres_outputs(target: Target, prompts: list[str], plans: list[OutputPlan], settings: dict, *,
                             seed: int, upscale: float, config=None, fps: float | None = None, progress: bool = True,
                             log: Callable = print) -> list[dict]:
    """Run ``diffattn.pipelines.highres.generate_highres`` for each prompt and write its frames and
    JSON record as ``plans`` say; returns the records. Errors in the arguments (factor, window,
    strength, pipeline family) raise :class:`UserError` before any generation."""
    from .pipelines.highres import HighResConfig, generate_highres

    config = config or HighResConfig()
    fps = 16.0 if fps is None else float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise UserError(f"--fps must be a positive number, got {fps}")
    base = {key: settings[key] for key in _BASE_KEYS if key in settings}
    records = []
    for i, (prompt, plan) in enumerate(zip(prompts, plans), start=1):
        if len(prompts) > 1:
            log(f"[{i}/{len(prompts)}] {prompt}")
        try:
            result = generate_highres(target.pipe, prompt, upscale=upscale, config=config, seed=seed,
                                      progress=progress, log=log, **base)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise UserError(f"--upscale: {exc}") from None
        frames = result.frames
        record = {
            "tool": "diffattn generate --upscale",
            "note": target.note,
            "prompt": prompt,
            "seed": seed,
            "model": target.record(),
            **{k: v for k, v in result.record.items() if k != "timings_s"},
            **frames_record(frames, fps),
            "timings_s": _rounded({"load": target.load_s, **result.record["timings_s"]}),
            "timings_note": ("base_pass = the pipeline call at the native size; highres_pass: encode = prompt "
                             "encoding, VAE encoding and re-noising, steps = each denoising step (every branch "
                             "and the CFG pass), decode = VAE decoding"),
            "versions": versions(),
        }
        written = write_outputs(frames, plan, record, fps=fps)
        record["outputs"] = written
        records.append(record)
        log(f"wrote {', '.join(written.values())} ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, "
            f"upscaled from {result.base_frames.shape[2]}x{result.base_frames.shape[1]}, "
            f"in {result.record['timings_s']['total']:.1f} s)")
    if target.embedded:
        log("note: " + target.note)
    return records
