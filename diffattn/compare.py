"""``diffattn compare``: one prompt and seed through dense attention and each method; speed and quality.

What is measured, per method, against the dense run of the same prompt, seed and settings:

- **wall time** of the pipeline call (median of ``repeats`` runs, after an optional warm-up),
  the **speedup** ``dense time / method time``, and the time spent inside the self-attention
  modules (forward hooks; projections, norms and RoPE included);
- **PSNR** of the output frames (over all pixels of all frames, data range 1; identical frames
  have infinite PSNR, written ``null`` in ``compare.json`` with ``"frames_identical": true``);
- **SSIM**: scikit-image ``structural_similarity(channel_axis=-1, data_range=1)`` per frame,
  averaged over frames;
- **attention-level error**: during the dense run, at one denoising step (``attn_step``,
  default the middle step), the q/k/v that each self-attention layer receives in its first call
  of that step (the conditional branch under classifier-free guidance) are taken from the
  dense run's processors; ``diffattn.attention`` then runs both ``Dense()`` and the method's
  pattern on those same q/k/v, and the relative L1 ``||O - O_dense||_1 / ||O_dense||_1`` and the
  cosine similarity are recorded per layer. ``rel_l1_mean`` averages the pattern's error over
  all layers (the schedule ignored); ``rel_l1_effective_mean`` counts the layers the method's
  schedule keeps dense at that step as 0. The probe's own time is subtracted from the dense
  run's timings. The dense baseline runs diffattn's processors with ``Dense()``, which call
  diffusers' ``dispatch_attention_fn`` exactly as diffusers' own processors do (bit-identical
  output); the ``dense`` method, if asked for, runs diffusers' own processors.

With a step cache (``cache=StepCache(...)``, ``diffattn compare --cache``) every sparse method
runs with it (the dense baseline and a ``dense`` method never do): the frames, PSNR, SSIM and
times are those of the cached generation, each method's ``cache`` record gives the cache's peak
memory, and the probe adds the **cached attention error**: at the probe step ``s`` the pattern's
internal partial merged with the external partial computed at step ``s - (refresh_every - 1)``
(the oldest one the cache reuses; step 0 at the least) on the dense run's q/k/v of that layer,
against dense attention (``rel_l1_cached_mean``, ``cosine_cached_mean``; the drift gates are not
simulated). The stored external partials live on the CPU while the probe runs.

The report folder holds ``report.md``, ``report.html`` (dense frames next to each method's, and
the absolute difference), ``speed_quality.png`` (speedup against SSIM and PSNR), per-run PNG
contact sheets and MP4s, and ``compare.json`` with everything.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .generate import (
    cache_record,
    Method,
    UserError,
    _jsonable,
    _layers,
    guarded_record,
    _round_timings,
    all_dense_record,
    check_fits,
    check_writable,
    generation_settings,
    install,
    is_embedded,
    layout_record,
    load_target,
    predict_grid,
    run_once,
    slug,
    uninstall,
    versions,
)

__all__ = ["DEFAULT_METHODS", "AttentionProbe", "run_compare"]

#: Methods compared when none are given (they fit the embedded pipeline's default 5x16x16 grid and
#: grids down to 3x5x5).
DEFAULT_METHODS = ("window:3x5x5", "radial:0.2")
#: Frames shown per run in the report's contact sheets (evenly spaced).
SHEET_FRAMES = 8
DENSE_LABEL = "dense (baseline)"


class _ProbeCore:
    """Wraps a processor's ``SparseAttentionCore``: attends exactly as before, and hands the
    q/k/v of the probed step to an :class:`AttentionProbe`."""

    def __init__(self, inner, probe: "AttentionProbe", key: str):
        self.inner = inner
        self.probe = probe
        self.key = key

    def __getattr__(self, name):  # everything else is the wrapped core's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def attend(self, q, k, v, *, backend=None, parallel_config=None, attn_mask=None, visual_only=False):
        out = self.inner.attend(q, k, v, backend=backend, parallel_config=parallel_config, attn_mask=attn_mask,
                                visual_only=visual_only)
        self.probe.measure(self.key, self.inner.layer, self.inner.state, q, k, v, attn_mask, visual_only)
        return out


class AttentionProbe:
    """Attention-level error of each method on q/k/v captured from a dense run at one step.

    Args:
        methods: the methods to measure.
        step: the denoising step; None = the middle step (``num_steps // 2``).
        impl: ``diffattn.attention``'s impl for both Dense() and the patterns.
        cache: a ``StepCache``: also measure each sparse pattern with an external partial
            ``cache.refresh_every - 1`` steps old (see the module docstring). None: off.
    """

    def __init__(self, methods: list[Method], step: int | None, impl: str = "auto", cache=None):
        self.methods = methods
        self.step = step
        self.impl = impl
        self.cache = cache
        self.done: set[str] = set()
        self.externals_done: set[str] = set()
        self.externals: dict[tuple[str, str], tuple] = {}  # (processor, method label) -> (out_ext, lse_ext) on CPU
        self.layers: list[dict] = []  # one entry per measured processor: name, layer, errors per method label
        self.seconds = 0.0
        self.skipped: list[str] = []
        self.num_steps: int | None = None  # of the generation; for the schedule-effective error

    def wrap(self, pipe) -> int:
        """Wrap the cores of every diffattn processor in ``pipe``; returns how many."""
        from .generate import _transformers
        from .integration.processors import attn_processors

        count = 0
        for attr, transformer in _transformers(pipe).items():
            for name, proc in attn_processors(transformer).items():
                core = getattr(proc, "core", None)
                if core is not None and hasattr(core, "attend") and not isinstance(core, _ProbeCore):
                    proc.core = _ProbeCore(core, self, f"{attr}.{name}")
                    count += 1
        return count

    def measure(self, key, layer, state, q, k, v, attn_mask, visual_only) -> None:
        import torch

        from .integration.core import text_lens_from_mask
        from .tokens import TokenLayout

        if self.step is None:
            if state.num_steps is None:
                return
            self.step = state.num_steps // 2
        if state.layout is None:
            return
        at_reference = self.cache is not None and state.step == self.reference_step and key not in self.externals_done
        at_step = state.step == self.step and key not in self.done
        if not (at_reference or at_step):
            return
        _sync(q)
        t0 = time.perf_counter()
        layout = TokenLayout(state.layout.grid) if visual_only else state.layout
        text_lens = None
        if attn_mask is not None:
            text_lens = text_lens_from_mask(attn_mask, layout)
            if text_lens is None:
                self.done.add(key)
                self.externals_done.add(key)
                self.skipped.append(f"{key}: attention mask that is not text padding")
                self.seconds += time.perf_counter() - t0
                return
        with torch.no_grad():
            if at_reference:
                self.externals_done.add(key)
                self._store_externals(key, q, k, v, layout, text_lens)
            if at_step:
                self.done.add(key)
                self.layers.append(self._errors(key, layer, q, k, v, layout, text_lens))
        _sync(q)
        self.seconds += time.perf_counter() - t0

    @property
    def reference_step(self) -> int:
        """The step whose external partials the cached error reuses."""
        return max(0, (self.step or 0) - (self.cache.refresh_every - 1))

    def _cached_methods(self) -> list[Method]:
        return [m for m in self.methods if self.cache is not None and not m.pattern.is_dense]

    def _store_externals(self, key, q, k, v, layout, text_lens) -> None:
        from .partials import attention_partials

        from .attention import select_blocks

        for method in self._cached_methods():
            # a dynamic pattern's reuse steps keep the refresh's selection (as the step cache does)
            selection = None if method.pattern.static else select_blocks(q, k, method.pattern, layout, impl=self.impl)
            _, _, out_ex, lse_ex = attention_partials(q, k, v, method.pattern, layout=layout, impl=self.impl,
                                                      text_lens=text_lens, selection=selection)
            self.externals[(key, method.label)] = (out_ex.cpu(), lse_ex.cpu(), selection)

    def _errors(self, key, layer, q, k, v, layout, text_lens) -> dict:
        from .attention import attention
        from .integration.step_cache import light_merge
        from .metrics import attention_errors
        from .partials import merge_partials
        from .patterns import Dense

        entry = {"name": key, "layer": layer, "errors": {}, "errors_cached": {}}
        ref = attention(q, k, v, Dense(), layout=layout, impl=self.impl, text_lens=text_lens).float()
        cached = {m.label for m in self._cached_methods()}
        for method in self.methods:
            out, lse = attention(q, k, v, method.pattern, layout=layout, impl=self.impl, text_lens=text_lens,
                                 return_lse=True)
            entry["errors"][method.label] = attention_errors(out.float(), ref)
            stored = self.externals.pop((key, method.label), None)
            if method.label not in cached or stored is None:
                continue
            out_ex, lse_ex, selection = stored
            out_ex, lse_ex = out_ex.to(q.device), lse_ex.to(q.device)
            if selection is not None:
                out, lse = attention(q, k, v, method.pattern, layout=layout, impl=self.impl, text_lens=text_lens,
                                     return_lse=True, selection=selection)
            merged = light_merge(out, lse, lse_ex) if self.cache.light else merge_partials(out, lse, out_ex, lse_ex)[0]
            entry["errors_cached"][method.label] = attention_errors(merged.float(), ref)
        return entry

    def summary(self, method: Method) -> dict:
        """Per-layer errors of ``method`` and their means (see the module docstring)."""
        per_layer, effective = [], []
        for entry in self.layers:
            err = entry["errors"].get(method.label)
            if err is None:
                continue
            layer = entry["layer"]
            dense_here = self._schedule_dense(method.schedule, layer)
            row = {"name": entry["name"], "layer": layer, "rel_l1": err["rel_l1"], "cosine": err["cosine"],
                   "schedule_dense": dense_here}
            cached = entry.get("errors_cached", {}).get(method.label)
            if cached is not None:
                row["rel_l1_cached"], row["cosine_cached"] = cached["rel_l1"], cached["cosine"]
            per_layer.append(row)
            effective.append(0.0 if dense_here else err["rel_l1"])
        summary = {"step": self.step, "rel_l1_mean": None, "cosine_mean": None, "rel_l1_effective_mean": None}
        if self.cache is not None:
            summary.update(cache_reference_step=self.reference_step, rel_l1_cached_mean=None, cosine_cached_mean=None)
        if per_layer:
            summary.update(rel_l1_mean=float(np.mean([p["rel_l1"] for p in per_layer])),
                           cosine_mean=float(np.mean([p["cosine"] for p in per_layer])),
                           rel_l1_effective_mean=float(np.mean(effective)))
        with_cache = [p for p in per_layer if "rel_l1_cached" in p]
        if with_cache:
            summary.update(rel_l1_cached_mean=float(np.mean([p["rel_l1_cached"] for p in with_cache])),
                           cosine_cached_mean=float(np.mean([p["cosine_cached"] for p in with_cache])))
        return {**summary, "per_layer": per_layer}

    def _schedule_dense(self, schedule, layer: int) -> bool:
        step = self.step or 0
        n = self.num_steps
        return bool(layer < schedule.dense_layers or step < schedule.dense_steps
                    or (schedule.dense_last_steps and n is not None and step >= n - schedule.dense_last_steps))


def _sync(tensor) -> None:
    import torch

    if getattr(tensor, "is_cuda", False):
        torch.cuda.synchronize(tensor.device)


# --------------------------------------------------------------------------------------------


def _unique_slugs(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {"dense": 1}  # "dense" names the baseline's files
    out = []
    for label in labels:
        base = slug(label.replace(":", "-").replace(",", "-").replace("=", "-"), limit=40)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}-{n + 1}")
    return out


def _sheet_indices(count: int) -> list[int]:
    if count <= SHEET_FRAMES:
        return list(range(count))
    return sorted({round(i * (count - 1) / (SHEET_FRAMES - 1)) for i in range(SHEET_FRAMES)})


def _write_pictures(frames: np.ndarray, folder: Path, name: str, indices: list[int], fps: float) -> dict:
    from .video import write_png_grid, write_video

    columns = min(len(indices), 4)
    out = {"frames_png": write_png_grid(frames[indices], folder / f"frames-{name}.png", columns=columns).name}
    if frames.shape[0] > 1:
        out["mp4"] = write_video(frames, folder / f"{name}.mp4", fps=fps).name
    return out


def _write_diff(frames: np.ndarray, dense: np.ndarray, folder: Path, name: str, indices: list[int]) -> tuple[str, float]:
    """|frames - dense| of the sheet's frames, amplified by a power of two so the largest
    difference reaches about 0.8 (1 to 1024; 1 for identical frames). Returns (file, gain)."""
    from .video import write_png_grid

    diff = np.abs(frames[indices].astype(np.float64) - dense[indices])
    peak = float(diff.max())
    gain = 1.0 if peak == 0 else float(2 ** min(10, max(0, math.floor(math.log2(0.8 / peak)))))
    path = write_png_grid(np.clip(diff * gain, 0.0, 1.0), folder / f"diff-{name}.png", columns=min(len(indices), 4))
    return path.name, gain


def _fmt(value, spec: str = ".3f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf (identical)"
    return format(value, spec)


def _plot(rows: list[dict], path: Path) -> None:
    """Speedup against SSIM and PSNR, one labelled point per method (matplotlib, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_ssim, ax_psnr = fig.subplots(1, 2)
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None and math.isfinite(r["psnr_db"])]
    cap = (max(finite) + 5.0) if finite else 60.0
    for ax, key, ylabel in ((ax_ssim, "ssim", "SSIM vs dense (1 = identical)"),
                            (ax_psnr, "psnr_db", "PSNR vs dense (dB)")):
        ax.axvline(1.0, color="0.7", lw=1, ls="--")
        for r in rows:
            y = r[key]
            marker = "o"
            if key == "psnr_db" and (y is None or math.isinf(y)):
                y, marker = cap, "^"
            ax.scatter([r["speedup"]], [y], s=46, marker=marker, zorder=3)
            ax.annotate(r["label"], (r["speedup"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("speedup over dense (wall time)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if any(r["psnr_db"] is None or math.isinf(r["psnr_db"]) for r in rows):
        ax_psnr.set_title(f"triangles: identical frames (inf dB, drawn at {cap:.0f})", fontsize=8)
    fig.suptitle("diffattn compare: speed vs quality (higher and further right is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))


# --------------------------------------------------------------------------------------------


def run_compare(*, prompt: str, seed: int, methods: list[Method], model: str | None = None, preset=None,
                preset_name: str | None = None, settings_cli: dict | None = None, out: str = "outputs/compare",
                impl: str = "auto", device: str | None = None, dtype: str = "auto", attn_step: int | None = None,
                repeats: int = 1, warmup: bool = True, fps: float = 16.0, progress: bool = True,
                log: Callable = print, cache=None, random_weights: bool = False) -> dict:
    """Run the comparison and write the report folder; returns the ``compare.json`` record.

    ``random_weights``: the embedded pipeline with random weights (its frames are noise).

    ``cache``: a ``diffattn.StepCache`` every sparse method runs with (None: no cache).
    """
    from .attention import choose_impl
    from .integration.core import Schedule
    from .integration.step_cache import StepCache
    from .patterns import Dense, Piecewise

    t_start = time.perf_counter()
    if not methods:
        raise UserError("give at least one method to compare")
    if cache is not None:
        if not isinstance(cache, StepCache):
            raise UserError(f"cache must be a diffattn.StepCache or None, got {type(cache).__name__}")
        if all(m.plain_dense for m in methods):
            raise UserError("--cache needs a sparse method: dense attention has nothing to reuse")
        for m in methods:
            if isinstance(m.pattern, Piecewise):
                raise UserError(f"--cache does not apply to method {m.label!r}: Piecewise already covers every key")
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {str(folder)!r} exists and is not a folder")
    if folder.suffix.lower() in (".json", ".md", ".html", ".png"):
        raise UserError(f"--out is the report folder, got a file name {str(folder)!r}")
    check_writable(folder)
    explicit_model = model is not None
    if model is None:
        model = getattr(preset, "model", None) if preset is not None else None
    if model is None:
        model = next((m.model for m in methods if m.model), None)
    if not explicit_model:
        for m in methods:
            if m.model is None or (is_embedded(m.model) and is_embedded(model)):
                continue
            if str(m.model) != str(model):
                raise UserError(f"method {m.label!r} is a preset for model {m.model!r}, but this comparison runs "
                                f"{model!r}; compare presets of one model, or choose the model with --model")
    base_preset = preset if preset is not None else next((m.loaded_preset for m in methods if m.loaded_preset), None)
    loading_preset = preset
    if loading_preset is None and base_preset is not None and not is_embedded(model) \
            and str(getattr(base_preset, "model", None)) == str(model):
        loading_preset = base_preset  # the model came from a method's preset: load it the preset's way
    target = load_target(model, loading_preset, device=device, dtype=dtype, log=log, random_weights=random_weights)
    settings = generation_settings(target, base_preset, **(settings_cli or {}))
    num_steps = settings.get("num_inference_steps")
    if attn_step is not None:
        if attn_step < 0 or (num_steps is not None and attn_step >= num_steps):
            raise UserError(f"--attn-step must be in [0, {num_steps - 1 if num_steps else 'steps - 1'}], got {attn_step}")
    grid = predict_grid(target.pipe, settings)
    for m in methods:
        check_fits(m, grid)
    try:
        impl_used = choose_impl(impl, target.device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    pipe = target.pipe
    layers = _layers(pipe)
    for m in methods:  # warned before the runs; recorded per method below
        all_dense_record(m, num_steps, layers, log)
    labels = [m.label for m in methods]
    slugs = _unique_slugs(labels)
    dense_method = Method(DENSE_LABEL, "dense", Dense(), Schedule())

    # Warm-up: every configuration once, 2 steps, all layers sparse; the decoder once (dense).
    if warmup:
        warm_settings = dict(settings, num_inference_steps=min(2, num_steps or 2))
        log("warm-up (2 steps per method; only the dense one decodes)...")
        for i, m in enumerate([dense_method, *methods]):
            install(pipe, dataclasses.replace(m, schedule=Schedule()), impl, _cache_for(m, cache))
            run_once(pipe, prompt, seed, warm_settings, device=target.device, check=m, progress=False,
                     output_type="np" if i == 0 else "latent")
        uninstall(pipe)

    # Dense baseline, with the attention probe.
    from .integration import apply

    apply(pipe, Dense(), impl=impl)
    probe = AttentionProbe(methods, attn_step, impl=impl, cache=cache)
    probe.wrap(pipe)
    log(f"[{DENSE_LABEL}] generating...")
    dense_runs = []
    for r in range(repeats):
        before = probe.seconds
        result = run_once(pipe, prompt, seed, settings, device=target.device, progress=progress,
                          exclude_time=lambda: probe.seconds - before)
        excluded = result.timings.get("excluded_probe", 0.0)
        steps = result.timings.get("steps")
        if excluded and steps and probe.step is not None and probe.step < len(steps):
            steps[probe.step] -= excluded  # the probe ran inside that step
        dense_runs.append(result)
    uninstall(pipe)
    dense = dense_runs[0]
    layout = dense.layout
    if layout is not None:
        for m in methods:
            check_fits(m, layout.grid)
    num_steps = num_steps or (len(dense.timings.get("steps", [])) or None)
    probe.num_steps = num_steps
    dense_frames = dense.frames
    dense_time = statistics.median(r.timings["generate"] for r in dense_runs)
    dense_attn = _median_or_none(r.timings.get("self_attention") for r in dense_runs)
    dense_denoise = _median_or_none(r.timings.get("denoising") for r in dense_runs)
    folder.mkdir(parents=True, exist_ok=True)
    indices = _sheet_indices(dense_frames.shape[0])
    dense_files = _write_pictures(dense_frames, folder, "dense", indices, fps)
    log(f"[{DENSE_LABEL}] {dense_time:.2f} s")

    rows = []
    for m, name in zip(methods, slugs):
        handle = install(pipe, m, impl, _cache_for(m, cache))
        log(f"[{m.label}] generating..." + (f" ({handle})" if handle is not None else " (diffusers' processors)"))
        runs = [run_once(pipe, prompt, seed, settings, device=target.device, check=m, progress=progress)
                for _ in range(repeats)]
        cache_used = cache_record(handle)  # before uninstalling: the handle's states hold the memory peak
        uninstall(pipe)
        frames = runs[0].frames
        from .metrics import psnr, ssim

        t = statistics.median(r.timings["generate"] for r in runs)
        attn_t = _median_or_none(r.timings.get("self_attention") for r in runs)
        denoise_t = _median_or_none(r.timings.get("denoising") for r in runs)
        p = psnr(frames, dense_frames)
        files = _write_pictures(frames, folder, name, indices, fps)
        files["diff_png"], files["diff_gain"] = _write_diff(frames, dense_frames, folder, name, indices)
        row = {
            **m.record(),
            **guarded_record([
                ("schedule", lambda: all_dense_record(m, num_steps, layers)),
                ("layout", lambda: {k: v for k, v in layout_record(m, runs[0].layout or layout, num_steps, layers).items()
                                    if k in ("attended_fraction", "effective_attended_fraction")}),
            ], log),
            "time_s": t,
            "times_s": [r.timings["generate"] for r in runs],
            "speedup": dense_time / t if t > 0 else None,
            "denoising_s": denoise_t,
            "denoising_speedup": (dense_denoise / denoise_t) if (dense_denoise and denoise_t) else None,
            "self_attention_s": attn_t,
            "self_attention_speedup": (dense_attn / attn_t) if (dense_attn and attn_t) else None,
            "psnr_db": p,
            "frames_identical": bool(math.isinf(p)),
            "ssim": ssim(frames, dense_frames),
            "attention_error": probe.summary(m),
            "cache": cache_used,
            "timings_s": _round_timings(runs[0].timings),
            "files": files,
        }
        rows.append(row)
        cached_line = ""
        if cache_used["enabled"]:
            cached_line = (f" ({_fmt(row['attention_error']['rel_l1_cached_mean'], '.4f')} with the cache), "
                           f"cache {cache_used['memory_bytes'] / 2**20:.1f} MiB")
        log(f"[{m.label}] {t:.2f} s, speedup {row['speedup']:.2f}x (denoising {_fmt(row['denoising_speedup'], '.2f')}x), PSNR {_fmt(p, '.2f')} dB, SSIM {row['ssim']:.4f}, "
            f"attention rel L1 {_fmt(row['attention_error']['rel_l1_mean'], '.4f')}{cached_line}")

    _plot(rows, folder / "speed_quality.png")
    record = {
        "tool": "diffattn compare",
        "note": target.note,
        "prompt": prompt,
        "seed": seed,
        "model": target.record(),
        "preset": preset_name,
        "settings": settings,
        "impl": impl,
        "impl_used": f"{impl_used[0]} ({impl_used[1]})",
        "token_grid": list(layout.grid) if layout is not None else None,
        "text_tokens": layout.text_len if layout is not None else None,
        "seq_len": layout.seq_len if layout is not None else None,
        "repeats": repeats,
        "warmup": warmup,
        "cache": _cache_summary(cache, rows),
        "dense": {
            "label": DENSE_LABEL,
            "time_s": dense_time,
            "times_s": [r.timings["generate"] for r in dense_runs],
            "denoising_s": dense_denoise,
            "self_attention_s": dense_attn,
            "timings_s": _round_timings(dense.timings),
            "files": dense_files,
        },
        "methods": rows,
        "attention_probe": {
            "step": probe.step,
            "layers_measured": len(probe.layers),
            "skipped": probe.skipped,
            "seconds": probe.seconds,
            "how": ("q/k/v captured from the dense run's self-attention processors at this step (first call of "
                    "each layer, the conditional branch under CFG); Dense() and each pattern run through "
                    "diffattn.attention on the same q/k/v; rel_l1 = ||O - O_dense||_1 / ||O_dense||_1. "
                    "rel_l1_mean ignores the schedule; rel_l1_effective_mean counts schedule-dense layers as 0."),
            **({} if cache is None else {
                "cache_reference_step": probe.reference_step,
                "how_cached": ("rel_l1_cached: the pattern's internal partial at this step merged with its external "
                               "partial computed at cache_reference_step (this step - (refresh_every - 1)) on the dense "
                               "run's q/k/v of the same layer, against Dense(); the drift gates are not simulated"),
            }),
        },
        "notes": [
            "psnr_db: over all pixels of all frames against the dense output, data range 1; null with "
            "frames_identical=true means identical frames (infinite PSNR)",
            "ssim: scikit-image structural_similarity(channel_axis=-1, data_range=1) per frame, mean over frames",
            "speedup: dense wall time / method wall time of the whole pipeline call (median of repeats); the "
            "attention probe's time is subtracted from the dense run",
            "diff-*.png: |method - dense| times files.diff_gain (a power of two bringing the largest difference "
            "near 0.8), clipped to [0, 1]",
        ],
        "versions": versions(),
        "timings_s": {"load": round(target.load_s, 3), "total": round(time.perf_counter() - t_start, 3)},
    }
    (folder / "compare.json").write_text(json.dumps(_jsonable(record), indent=1, allow_nan=False) + "\n")
    (folder / "report.md").write_text(_markdown(record))
    (folder / "report.html").write_text(_html(record))
    log(f"wrote {folder / 'report.md'}, {folder / 'report.html'}, {folder / 'speed_quality.png'} and "
        f"{folder / 'compare.json'} in {record['timings_s']['total']:.1f} s")
    if target.embedded:
        log("note: " + target.note + "; the speed numbers are of a tiny model")
    return record


def _cache_for(method: Method, cache):
    """The step cache a method runs with: none for dense attention (nothing to reuse)."""
    return None if method.plain_dense else cache


def _cache_summary(cache, rows: list[dict]) -> dict:
    """The run's step cache: its settings, and the largest peak memory of any method."""
    cached = [r["cache"] for r in rows if r["cache"]["enabled"]]
    if cache is None or not cached:
        return {"enabled": False, "memory_bytes": 0}
    return {**cached[0], "memory_bytes": max(c["memory_bytes"] for c in cached),
            "note": "every sparse method runs with this step cache (the dense baseline and dense methods never do); "
                    "memory_bytes: the largest of the methods' peaks; each method's own is in methods[i].cache"}


def _median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------
# Reports


def _table_rows(record: dict) -> list[list[str]]:
    d = record["dense"]
    with_cache = record["cache"]["enabled"]
    rows = [[DENSE_LABEL, "100%", "100%", _fmt(d["time_s"], ".2f"), "1.00x", "1.00x", "1.00x", "-", "-", "-", "-"]
            + (["-", "-"] if with_cache else [])]
    for r in record["methods"]:
        a = r["attention_error"]
        row = [
            r["label"], _fmt(r["attended_fraction"], ".1%"), _fmt(r["effective_attended_fraction"], ".1%"),
            _fmt(r["time_s"], ".2f"), _fmt(r["speedup"], ".2f") + "x",
            (_fmt(r["denoising_speedup"], ".2f") + "x") if r["denoising_speedup"] else "-",
            (_fmt(r["self_attention_speedup"], ".2f") + "x") if r["self_attention_speedup"] else "-",
            _fmt(r["psnr_db"], ".2f"), _fmt(r["ssim"], ".4f"), _fmt(a["rel_l1_mean"], ".4f"), _fmt(a["cosine_mean"], ".4f"),
        ]
        if with_cache:
            used = r["cache"]["enabled"]
            row += [_fmt(a.get("rel_l1_cached_mean"), ".4f"), _fmt(r["cache"]["memory_bytes"] / 2**20, ".1f") if used else "-"]
        rows.append(row)
    return rows


HEADERS = ["method", "attended", "effective", "time (s)", "speedup", "denoising speedup", "self-attn speedup",
           "PSNR (dB)", "SSIM", "attn rel L1", "attn cosine"]
CACHE_HEADERS = ["attn rel L1 with cache", "cache (MiB)"]


def _headers(record: dict) -> list[str]:
    return HEADERS + (CACHE_HEADERS if record["cache"]["enabled"] else [])


def _settings_line(record: dict) -> str:
    s = record["settings"]
    parts = [f"model: {record['model']['description']}"]
    if "width" in s and "height" in s:
        parts.append(f"{s['width']}x{s['height']}")
    if "num_frames" in s:
        parts.append(f"{s['num_frames']} frames")
    if "num_inference_steps" in s:
        parts.append(f"{s['num_inference_steps']} steps")
    if "guidance_scale" in s:
        parts.append(f"guidance {s['guidance_scale']:g}")
    parts.append(f"seed {record['seed']}")
    parts.append(f"{record['model']['device']}, {record['model']['dtype']}, impl {record['impl_used']}")
    if record["token_grid"]:
        parts.append(f"token grid {'x'.join(map(str, record['token_grid']))}")
    return "; ".join(parts)


def _cache_notes(record: dict, probe: dict) -> list[str]:
    cache = record["cache"]
    if not cache["enabled"]:
        return []
    config = ", ".join(f"{k}={v}" for k, v in cache["config"].items() if v not in (None, False))
    return [f"- *step cache* ({config}): every sparse method ran with it (frames, PSNR, SSIM and times are of the "
            "cached generation); *attn rel L1 with cache*: the internal partial at the probe step merged with the "
            f"external partial of step {probe.get('cache_reference_step')} (the oldest the cache reuses) on the dense "
            "run's q/k/v; *cache (MiB)*: the peak memory the cache held."]


# After the embedded pipeline's note: its CPU times say nothing of GPU speed.
_NOTE_TAIL = "Its times are of a tiny model on this machine's CPU path, not of the GPU kernels."


def _markdown(record: dict) -> str:
    lines = ["# diffattn compare", ""]
    if record["note"]:
        lines += [f"> **Note:** {record['note']}. {_NOTE_TAIL}", ""]
    lines += [f"Prompt: *{record['prompt']}*", "", _settings_line(record), ""]
    headers = _headers(record)
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(record)]
    probe = record["attention_probe"]
    lines += [
        "",
        "- *attended*: fraction of token pairs the pattern attends; *effective*: over all steps and layers, "
        "with the schedule's dense steps and layers counted as 1.",
        "- *speedup*: dense wall time / method wall time of the whole pipeline call "
        f"(median of {record['repeats']} run(s){', after a warm-up' if record['warmup'] else ''}); "
        "*denoising speedup*: the same for the denoising loop alone (first transformer call to the last step); "
        "*self-attn speedup*: time inside the self-attention modules (forward hooks).",
        "- *PSNR* over all pixels of all frames against the dense output (data range 1); *inf* = identical frames.",
        "- *SSIM*: scikit-image `structural_similarity(channel_axis=-1, data_range=1)` per frame, averaged.",
        f"- *attn rel L1* / *cosine*: at denoising step {probe['step']}, on the q/k/v of the dense run, "
        "`||O - O_dense||_1 / ||O_dense||_1` of the pattern against Dense (both through `diffattn.attention`), "
        f"averaged over {probe['layers_measured']} self-attention calls (schedule ignored; see compare.json for "
        "per-layer values and the schedule-effective mean).",
        *_cache_notes(record, probe),
        "",
        "![speed vs quality](speed_quality.png)",
        "",
        "## Frames",
        "",
        f"Dense: ![dense]({record['dense']['files']['frames_png']})",
        "",
    ]
    for r in record["methods"]:
        f = r["files"]
        lines += [f"### {r['label']}", "",
                  f"| dense | {r['label']} | abs. difference x{f['diff_gain']:g} |", "|---|---|---|",
                  f"| ![dense]({record['dense']['files']['frames_png']}) | ![{r['label']}]({f['frames_png']}) | "
                  f"![diff]({f['diff_png']}) |", ""]
    lines += ["Full record: [compare.json](compare.json)", ""]
    return "\n".join(lines)


def _html(record: dict) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in _headers(record))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _table_rows(record))
    dense_png = e(record["dense"]["files"]["frames_png"])
    blocks = []
    for r in record["methods"]:
        f = r["files"]
        blocks.append(
            f"<h3>{e(r['label'])}</h3><p>PSNR {e(_fmt(r['psnr_db'], '.2f'))} dB, SSIM {e(_fmt(r['ssim'], '.4f'))}, "
            f"speedup {e(_fmt(r['speedup'], '.2f'))}x</p>"
            f"<div class='row'><figure><img src='{dense_png}'><figcaption>dense</figcaption></figure>"
            f"<figure><img src='{e(f['frames_png'])}'><figcaption>{e(r['label'])}</figcaption></figure>"
            f"<figure><img src='{e(f['diff_png'])}'><figcaption>|difference| x{f['diff_gain']:g}</figcaption></figure></div>"
        )
    note = f"<p class='note'><b>Note:</b> {e(record['note'])}. {e(_NOTE_TAIL)}</p>" \
        if record["note"] else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>diffattn compare</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.row {{ display: flex; gap: 12px; flex-wrap: wrap; }} figure {{ margin: 0; }} img {{ max-width: 440px; image-rendering: pixelated; }}
.note {{ background: #fff3cd; padding: 8px; }}
</style></head><body>
<h1>diffattn compare</h1>
{note}
<p>Prompt: <i>{e(record['prompt'])}</i></p>
<p>{e(_settings_line(record))}</p>
<table><tr>{head}</tr>{body}</table>
<p>PSNR over all pixels of all frames against the dense output (inf = identical frames); SSIM from scikit-image,
averaged over frames; attention rel L1 at step {e(str(record['attention_probe']['step']))} on the dense run's q/k/v.
Details: <a href="compare.json">compare.json</a>.</p>
<img src="speed_quality.png" style="max-width: 900px">
<h2>Frames</h2>
{''.join(blocks)}
</body></html>
"""
