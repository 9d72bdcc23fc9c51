"""Sparse attention on learned attention: the trained embedded pipeline, dense vs every method (CPU).

    .venv/bin/python benchmarks/embedded_quality.py            # writes benchmarks/results/embedded-quality*.{md,json,png}
    .venv/bin/python benchmarks/embedded_quality.py --prompts 2 --out /tmp/q   # a quick look

The embedded pipeline's transformer and VAE are trained (``diffattn.pipelines.train_embedded``)
on procedural clips of coloured shapes, so its attention maps are learned ones, not the
near-uniform maps of random weights. For each of ``--prompts`` fixed (prompt, seed) pairs
(:data:`PROMPTS`: every colour, shape and motion; some with two objects) it generates at the
trained size (256 x 256, 17 frames: a 5 x 16 x 16 token grid; 8 steps, guidance 5) once dense and
once with each method of :data:`METHODS` (the first ``--dense-steps`` steps dense, as
``diffattn demo`` does), and reports per method:

- **PSNR / SSIM** of its frames against the dense frames (``diffattn.metrics``);
- **attention relative L1** per transformer layer: ``||sparse - dense||_1 / ||dense||_1`` of the
  self-attention output on the q/k/v captured from the dense run at the middle step
  (``diffattn.compare.AttentionProbe``), averaged over the prompts;
- **computed fraction**: the share of (query, key) pairs computed exactly — the pattern's
  attended fraction for window and radial, the share of selected blocks (measured at the probe
  step, all layers and prompts) for top-k and piecewise (piecewise also approximates the other
  blocks from their means);
- **prompt adherence**: the share of clips where ``shapes_data.check_prompt`` finds every named
  colour and sees its centroid move the asked way (or stand still), for the dense run and for
  the method.

Outputs: ``embedded-quality.md`` (the table), ``embedded-quality.json`` (everything, per prompt),
``embedded-quality-pareto.png`` (computed fraction vs PSNR and vs attention error). Runs one
torch thread by default (faster than two on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: (prompt, seed) pairs: every colour, shape and motion, and four two-object prompts.
PROMPTS: tuple[tuple[str, int], ...] = (
    ("a red circle moving right", 0),
    ("a green square moving left", 1),
    ("a blue triangle moving up", 2),
    ("a yellow circle moving down", 3),
    ("a white square standing still", 4),
    ("a red triangle moving left", 5),
    ("a green circle moving up", 6),
    ("a blue square moving down", 7),
    ("a yellow triangle moving right", 8),
    ("a white circle moving left", 9),
    ("a red square moving up", 10),
    ("a green triangle standing still", 11),
    ("a blue circle moving right", 12),
    ("a yellow square moving left", 13),
    ("a white triangle moving down", 14),
    ("a red circle standing still", 15),
    ("a green square moving right", 16),
    ("a blue triangle moving left", 17),
    ("a yellow circle moving up", 18),
    ("a white square moving right", 19),
    ("a red circle moving right and a blue square moving left", 20),
    ("a yellow triangle moving up and a green circle moving down", 21),
    ("a white circle standing still and a red triangle moving right", 22),
    ("a blue square moving down and a yellow circle moving left", 23),
)

#: Pattern specs (see ``diffattn show`` / diffattn.patterns.spec): two windows, radial,
#: block top-k at two densities, piecewise (block means only, and with the pooled first-order term).
METHODS: tuple[str, ...] = (
    "window:3x5x5",
    "window:3x9x9",
    "radial:0.2",
    "topk:0.25",
    "topk:0.5",
    "piecewise:0.25,order=0",
    "piecewise:0.25",
)


def _probe_class():
    from diffattn.attention import select_blocks
    from diffattn.compare import AttentionProbe

    class SelectionProbe(AttentionProbe):
        """AttentionProbe that also records, per layer, the share of blocks a dynamic pattern selects."""

        def _errors(self, key, layer, q, k, v, layout, text_lens):
            entry = super()._errors(key, layer, q, k, v, layout, text_lens)
            entry["selected"] = {m.label: float(select_blocks(q, k, m.pattern, layout, impl=self.impl).float().mean())
                                 for m in self.methods if not m.pattern.static}
            return entry

    return SelectionProbe


def run(prompts, methods, *, steps: int, dense_steps: int, out: Path, progress: bool = True, log=print) -> dict:
    from diffattn.generate import attended_fraction, resolve_method, versions
    from diffattn.integration import Schedule, apply, remove
    from diffattn.metrics import psnr, ssim
    from diffattn.patterns import Dense
    from diffattn.pipelines import EMBEDDED_DEFAULTS, build_embedded_wan_pipeline
    from diffattn.pipelines.shapes_data import check_prompt
    from diffattn.tokens import TokenLayout

    t_start = time.perf_counter()
    pipe = build_embedded_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = EMBEDDED_DEFAULTS.call_kwargs(num_inference_steps=steps)
    resolved = [resolve_method(spec, dense_steps=dense_steps) for spec in methods]
    grid = (
        (settings["num_frames"] - 1) // 4 + 1,
        settings["height"] // 16,
        settings["width"] // 16,
    )
    layout = TokenLayout(grid)
    SelectionProbe = _probe_class()

    def generate(prompt, seed):
        t0 = time.perf_counter()
        frames = pipe(prompt, generator=torch.Generator().manual_seed(seed), **settings).frames[0]
        return frames, time.perf_counter() - t0

    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(prompts, desc="prompts", disable=not progress, dynamic_ncols=True)
    for prompt, seed in bar:
        apply(pipe, Dense())
        probe = SelectionProbe(resolved, None)
        probe.wrap(pipe)
        dense, dense_s = generate(prompt, seed)
        remove(pipe)
        probe.num_steps = steps
        row = {"prompt": prompt, "seed": seed, "dense": {"check": check_prompt(dense, prompt), "time_s": dense_s},
               "methods": {}}
        for method in resolved:
            apply(pipe, method.pattern, dense_steps=method.schedule.dense_steps)
            frames, seconds = generate(prompt, seed)
            remove(pipe)
            summary = probe.summary(method)
            selected = [e["selected"][method.label] for e in probe.layers if method.label in e.get("selected", {})]
            row["methods"][method.label] = {
                "psnr_db": psnr(frames, dense),
                "ssim": ssim(frames, dense),
                "rel_l1_per_layer": [p["rel_l1"] for p in summary["per_layer"]],
                "selected_fraction": float(np.mean(selected)) if selected else None,
                "check": check_prompt(frames, prompt),
                "time_s": seconds,
            }
        rows.append(row)
        bar.set_postfix(dense_ok=row["dense"]["check"]["ok"])

    summary = []
    for method in resolved:
        per = [r["methods"][method.label] for r in rows]
        static = attended_fraction(method, layout)
        fraction = static if static is not None else float(np.mean([p["selected_fraction"] for p in per]))
        layers = np.asarray([p["rel_l1_per_layer"] for p in per], dtype=np.float64)
        psnrs = [p["psnr_db"] for p in per]
        summary.append({
            "method": method.label,
            "computed_fraction": fraction,
            "computed_fraction_kind": "attended pairs" if static is not None else "selected blocks",
            "psnr_db_mean": float(np.mean([min(v, 100.0) for v in psnrs])),
            "psnr_db_min": float(min(min(psnrs), 100.0)),
            "ssim_mean": float(np.mean([p["ssim"] for p in per])),
            "rel_l1_per_layer": [float(v) for v in layers.mean(0)],
            "rel_l1_mean": float(layers.mean()),
            "adherence": float(np.mean([bool(p["check"]["ok"]) for p in per])),
            "shape_adherence": _shape_adherence([p["check"] for p in per]),
            "time_s_mean": float(np.mean([p["time_s"] for p in per])),
        })
    record = {
        "settings": {**settings, "dense_steps": dense_steps, "token_grid": list(grid), "seq_len": layout.seq_len,
                     "probe_step": steps // 2, "threads": torch.get_num_threads()},
        "dense": {"adherence": float(np.mean([bool(r["dense"]["check"]["ok"]) for r in rows])),
                  "shape_adherence": _shape_adherence([r["dense"]["check"] for r in rows]),
                  "time_s_mean": float(np.mean([r["dense"]["time_s"] for r in rows]))},
        "methods": summary,
        "prompts": rows,
        "machine": _machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedded-quality.json").write_text(json.dumps(record, indent=1, default=_json_default))
    (out / "embedded-quality.md").write_text(markdown(record))
    plot(record, out / "embedded-quality-pareto.png")
    log(markdown(record))
    return record


def _shape_adherence(checks) -> float:
    """The share of the prompts' objects whose shape the detector reads as asked."""
    objects = [o for check in checks for o in check["objects"]]
    return float(np.mean([bool(o["shape_ok"]) for o in objects])) if objects else float("nan")


def _machine() -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(), "threads": torch.get_num_threads()}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(type(value))


def markdown(record: dict) -> str:
    s = record["settings"]
    n = len(record["prompts"])
    layers = len(record["methods"][0]["rel_l1_per_layer"]) if record["methods"] else 0
    lines = [
        "# Sparse attention on the trained embedded pipeline (learned attention, CPU)",
        "",
        f"`benchmarks/embedded_quality.py`: {n} fixed (prompt, seed) pairs, {s['num_frames']} frames of "
        f"{s['width']}x{s['height']} (token grid {'x'.join(map(str, s['token_grid']))} = {s['seq_len']} tokens), "
        f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}; every method runs its first "
        f"{s['dense_steps']} steps dense. PSNR/SSIM against the dense frames of the same prompt and seed; attention "
        f"relative L1 of the self-attention output on q/k/v captured from the dense run at step {s['probe_step']}, "
        f"per layer; prompt adherence: the named colours found and moving the asked way "
        f"(`diffattn.pipelines.shapes_data.check_prompt`); shape: the objects whose shape the detector reads as "
        f"asked (bounding-box fill of the colour's largest blob). Dense adherence: "
        f"**{record['dense']['adherence']:.0%}**, shape **{record['dense']['shape_adherence']:.0%}**.",
        "",
        "| method | computed fraction | PSNR dB (mean / min) | SSIM | attention rel. L1 per layer "
        f"({', '.join(f'L{i}' for i in range(layers))}) | adherence (dense {record['dense']['adherence']:.0%}) | "
        f"shape (dense {record['dense']['shape_adherence']:.0%}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in record["methods"]:
        kind = "" if m["computed_fraction_kind"] == "attended pairs" else " (blocks)"
        lines.append(
            f"| `{m['method']}` | {m['computed_fraction']:.3f}{kind} | {m['psnr_db_mean']:.2f} / {m['psnr_db_min']:.2f} | "
            f"{m['ssim_mean']:.4f} | {', '.join(f'{v:.3f}' for v in m['rel_l1_per_layer'])} | {m['adherence']:.0%} | "
            f"{m['shape_adherence']:.0%} |"
        )
    lines += [
        "",
        "Computed fraction: attended (query, key) pairs for window and radial; for top-k and piecewise the share of "
        "key blocks selected (measured at the probe step, over all layers and prompts; piecewise also approximates "
        "the unselected blocks from their block means). PSNR is capped at 100 dB.",
        "",
        "![computed fraction vs PSNR](embedded-quality-pareto.png)",
        "",
        f"Run {record['date']} on {record['machine']['cpu']} ({record['machine']['cores']} cores, "
        f"{record['machine']['threads']} torch thread(s)) in {record['wall_s'] / 60:.1f} min; "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = record["methods"]
    families = {"window": "C0", "radial": "C1", "topk": "C2", "piecewise": "C3"}
    for m in methods:
        color = families.get(m["method"].split(":")[0], "k")
        x = m["computed_fraction"]
        for ax, y in ((axes[0], m["psnr_db_mean"]), (axes[1], m["rel_l1_mean"])):
            ax.scatter([x], [y], color=color, s=40, zorder=3)
            ax.annotate(m["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    # Pareto front of (fraction low, PSNR high)
    pts = sorted((m["computed_fraction"], m["psnr_db_mean"]) for m in methods)
    front, best = [], -math.inf
    for x, y in pts:
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        axes[0].plot(*zip(*front), color="0.6", ls="--", lw=1, zorder=1, label="Pareto front")
        axes[0].legend(loc="lower right", fontsize=8)
    s = record["settings"]
    axes[0].set(xlabel="computed fraction of attention", ylabel="PSNR vs dense (dB)",
                title=f"frames: {len(record['prompts'])} prompts, {'x'.join(map(str, s['token_grid']))} tokens")
    axes[1].set(xlabel="computed fraction of attention", ylabel="attention relative L1 (mean over layers)",
                title=f"self-attention output at step {s['probe_step']}")
    for ax in axes:
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20, help=f"how many of the {len(PROMPTS)} prompts, default 20")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="pattern specs")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps, default 8")
    parser.add_argument("--dense-steps", type=int, default=2, help="first N steps dense for every method, default 2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, default 1")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}], got {args.prompts}")
    torch.set_num_threads(args.threads)
    run(PROMPTS[: args.prompts], args.methods, steps=args.steps, dense_steps=args.dense_steps, out=Path(args.out),
        progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
