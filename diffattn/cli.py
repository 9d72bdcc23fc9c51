"""The ``diffattn`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


#: The pattern spec forms, for --help (diffattn/patterns/spec.py has the grammar).
SPEC_FORMS = ("dense | window:3x9x9[,stride=1x2x2,dilation=1x2x2,tile=true] ('*' = whole axis) | "
              "radial:0.2[,sink=false] | topk:0.25 | topk:cdf=0.9[,block=64,similarity=0.3] | "
              "piecewise:0.25[,order=0,first_order=pooled|shared|exact|lowrank]")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``diffattn generate: error: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 832x480 (WIDTHxHEIGHT), got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size must be two positive sizes like 832x480, got {text!r}")
    return width, height


def _grid(text: str) -> tuple:
    try:
        grid = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 21x30x52 (FxHxW) or 64x64 (HxW), got {text!r}") from None
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"grid must be 2 or 3 positive sizes like 21x30x52, got {text!r}")
    return grid


def _block(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block must look like 128x64, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2:
        raise argparse.ArgumentTypeError(f"block must look like 128x64, got {text!r}")
    return sizes


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.dense_steps < 0:
        raise CliError(f"--dense-steps must be >= 0, got {args.dense_steps}")
    try:
        run_demo(args.out, pattern_spec=args.pattern, prompt=args.prompt, seed=args.seed,
                 dense_steps=args.dense_steps, steps=args.steps, impl=args.impl, progress=not args.no_progress,
                 random_weights=args.random_weights)
    except (ValueError, TypeError) as exc:
        raise CliError(_one_line(exc)) from None
    return 0


def _check_generation_args(args) -> dict:
    """Checks shared by generate and compare; returns the command line's generation settings."""
    for name in ("steps", "frames", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name} must be >= 1, got {value}")
    for name in ("dense_steps", "dense_layers", "dense_last_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CliError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("guidance", "guidance_2"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < float("inf"):
            raise CliError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
    if args.fps is not None and not 0 < args.fps < float("inf"):
        raise CliError(f"--fps must be > 0, got {args.fps}")
    if args.cache is not None:
        from .integration.step_cache import parse_step_cache

        try:
            args.step_cache = parse_step_cache(args.cache)
        except (ValueError, TypeError) as exc:
            raise CliError(f"--cache: {exc}") from None
    else:
        args.step_cache = None
    height, width = args.height, args.width
    if args.size is not None:
        if height is not None or width is not None:
            raise CliError("give either --size WxH or --height/--width, not both")
        width, height = args.size
    return {"height": height, "width": width, "num_frames": args.frames, "num_inference_steps": args.steps,
            "guidance_scale": args.guidance, "guidance_scale_2": args.guidance_2}


@contextlib.contextmanager
def _user_errors_as_cli():
    """Errors caused by the user's arguments become one CLI line (DIFFATTN_DEBUG=1 re-raises
    everything but diffattn's own argument errors, for a traceback)."""
    from .generate import UserError

    try:
        yield
    except UserError as exc:
        raise CliError(_one_line(exc)) from None
    except (ValueError, NotImplementedError, OSError) as exc:
        if os.environ.get("DIFFATTN_DEBUG"):
            raise
        raise CliError(_one_line(exc)) from None


def cmd_generate(args) -> int:
    from .generate import generate, load_preset, read_prompts, resolve_method

    settings = _check_generation_args(args)
    with _user_errors_as_cli():
        prompts = read_prompts(args.prompt, args.prompts)
        preset = load_preset(args.preset) if args.preset else None
        method = resolve_method(args.method, preset=preset, preset_name=args.preset, allow_presets=False,
                                dense_steps=args.dense_steps, dense_layers=args.dense_layers,
                                dense_last_steps=args.dense_last_steps)
        highres = _highres_config(args, method)
        if args.ulysses < 1:
            raise CliError(f"--ulysses must be a number of processes >= 1, got {args.ulysses}")
        if args.ulysses > 1 and args.upscale is not None:
            raise CliError("--ulysses does not combine with --upscale yet")
        if args.ulysses_anything and args.ulysses == 1:
            raise CliError("--ulysses-anything needs --ulysses N with N > 1")
        if args.ulysses > 1 and args.device not in (None, "auto"):
            raise CliError(f"--device {args.device}: under --ulysses each rank uses the GPU of its LOCAL_RANK; "
                           "leave --device out")
        try:
            generate(prompts=prompts, seed=args.seed, method=method, model=args.model, preset=preset,
                     preset_name=args.preset, settings_cli=settings, out=args.out, impl=args.impl,
                     device=args.device, dtype=args.dtype, fps=args.fps, progress=not args.no_progress,
                     cache=args.step_cache, upscale=args.upscale, highres=highres, ulysses=args.ulysses,
                     ulysses_anything=args.ulysses_anything, random_weights=args.random_weights)
        finally:
            if args.ulysses > 1:
                import torch.distributed

                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
    return 0


def _highres_config(args, method):
    """The ``--upscale`` / ``--highres`` settings as a ``HighResConfig`` (None without --upscale)."""
    if args.upscale is None:
        if args.highres is not None:
            raise CliError("--highres needs --upscale FACTOR")
        return None
    import math

    if not math.isfinite(args.upscale) or args.upscale <= 1:
        raise CliError(f"--upscale must be a factor > 1 of the native frame size, got {args.upscale:g}")
    if not method.plain_dense:
        raise CliError("--upscale runs its own inward window on the high-resolution pass; leave --method out "
                       "(or dense) and set the window with --highres window=HxW")
    if args.step_cache is not None:
        raise CliError("--cache does not combine with --upscale (the high-resolution pass has its own cache: "
                       "--highres guide_every=K)")
    from .pipelines.highres import parse_highres_config

    try:
        overrides = {} if "impl=" in (args.highres or "") else {"impl": args.impl}
        return parse_highres_config(args.highres, **overrides)
    except (ValueError, TypeError) as exc:
        raise CliError(f"--highres: {exc}") from None


def cmd_compare(args) -> int:
    from .compare import DEFAULT_METHODS, run_compare
    from .generate import is_embedded, load_preset, read_prompts, resolve_method

    settings = _check_generation_args(args)
    with _user_errors_as_cli():
        (prompt,) = read_prompts(args.prompt, None)
        preset = load_preset(args.preset) if args.preset else None
        specs = args.methods
        if not specs:
            if preset is not None:
                specs = [None]
            elif is_embedded(args.model):
                specs = list(DEFAULT_METHODS)
            else:
                raise CliError("--methods is needed with --model (pattern specs or preset names)")
        schedule = {"dense_steps": args.dense_steps, "dense_layers": args.dense_layers,
                    "dense_last_steps": args.dense_last_steps}
        methods = [resolve_method(spec, preset=preset, preset_name=args.preset, **schedule) for spec in specs]
        run_compare(prompt=prompt, seed=args.seed, methods=methods, model=args.model, preset=preset,
                    preset_name=args.preset, settings_cli=settings, out=args.out, impl=args.impl, device=args.device,
                    dtype=args.dtype, attn_step=args.attn_step, repeats=args.repeats, warmup=not args.no_warmup,
                    fps=args.fps or 16.0, progress=not args.no_progress, cache=args.step_cache,
                    random_weights=args.random_weights)
    return 0


def _add_generation_args(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, default 0")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's, else 8 for the embedded model, "
                                              "else the pipeline's)")
    p.add_argument("--size", type=_size, metavar="WxH", help="frame size in pixels, e.g. 832x480 (or --width/--height)")
    p.add_argument("--height", type=int, help="frame height in pixels")
    p.add_argument("--width", type=int, help="frame width in pixels")
    p.add_argument("--frames", type=int, help="number of frames (Wan: 4k + 1; 1 = an image)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--guidance-2", type=float, dest="guidance_2",
                   help="guidance scale of the low-noise expert of a two-expert (Wan 2.2) pipeline, default --guidance")
    p.add_argument("--dense-steps", type=int, help="first N denoising steps dense (default: the preset's, else 0)")
    p.add_argument("--dense-layers", type=int, help="first L transformer blocks dense (default: the preset's, else 0)")
    p.add_argument("--dense-last-steps", type=int, help="last M steps dense (default: the preset's, else 0)")
    p.add_argument("--cache", nargs="?", const="default", metavar="CONFIG",
                   help="reuse the block-external attention across steps: '--cache' (refresh every 3 steps) or "
                        "'--cache refresh_every=3,store_dtype=bfloat16,offload=true,lse_gate=0.05,cosine_gate=0.85'")
    p.add_argument("--model", help="local pipeline folder or hub id; default: the embedded tiny Wan pipeline "
                                   "(trained on clips of coloured shapes: prompts like 'a red circle moving right'), "
                                   "or the preset's model")
    p.add_argument("--random-weights", action="store_true",
                   help="the embedded pipeline with random DiT and VAE weights (seeded; its frames are noise)")
    p.add_argument("--preset", help="preset name or YAML file: model, method, schedule and generation settings")
    p.add_argument("--impl", choices=["auto", "triton", "reference"], default="auto",
                   help="sparse attention implementation, default auto (Triton on CUDA, torch reference on CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto: float32 for the embedded model and on CPU, bfloat16 on CUDA")
    p.add_argument("--fps", type=float, help="frames per second of written videos, default 16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_show(args) -> int:
    from .block_layout import build_block_layout

    if args.out:
        _check_picture_path(args.out)
    args.block_given = args.block is not None
    if args.block is None:
        args.block = (128, 64)
    from .patterns import parse_pattern
    from .tokens import TokenLayout

    try:
        pattern = parse_pattern(args.pattern)
        layout = TokenLayout(args.grid, text_len=args.text_len)
        block = args.block
        tiled = getattr(pattern, "tile", None) is not None
        if tiled:  # the blocks the kernel runs the tile-major order with (no partial block)
            block = pattern.tile_blocks(tuple(args.grid), *block, fixed=args.block_given)
        blocks = build_block_layout(pattern, args.grid, *block)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    print(f"{pattern}\n{layout}: attends {pattern.attended_fraction(layout):.2%} of token pairs")
    if tiled:
        print(f"tokens in tile-major order (tile {'x'.join(map(str, pattern.tile_shape(tuple(args.grid))))}), "
              f"kernel blocks {block[0]}x{block[1]}")
    print(blocks)
    if max(blocks.num_q_blocks, blocks.num_k_blocks) <= 64:
        print(blocks.render())
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        blocks.draw(args.out, title=f"{args.pattern} on {'x'.join(map(str, args.grid))}: computed {blocks.block_density:.1%}")
        print(f"wrote {args.out}")
    return 0


#: File types ``diffattn show --out`` writes (matplotlib's raster and vector formats).
PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def _check_picture_path(path: str) -> None:
    from pathlib import Path

    from .generate import UserError, check_writable

    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        raise CliError(f"--out {path!r}: unsupported extension {suffix or '(none)'!r}; allowed: "
                       f"{', '.join(PICTURE_SUFFIXES)}")
    try:
        check_writable(Path(path).parent)
    except UserError as exc:
        raise CliError(_one_line(exc)) from None


def cmd_env(args) -> int:
    import platform

    import torch

    from . import __version__
    from .attention import choose_impl

    info = {"diffattn": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "diffusers", "transformers", "xformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "not installed"
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impl, why = choose_impl("auto", torch.device(device))
    info["impl_auto"] = f"{impl} ({why})"
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_bench(args) -> int:
    if args.what != "kernels":
        raise CliError(f"unknown benchmark {args.what!r}; allowed: kernels")
    import torch

    from .bench.kernels import SHAPES, run_kernel_benchmark, write_json

    if not torch.cuda.is_available():
        raise CliError("diffattn bench kernels needs a CUDA GPU; none is available on this machine")
    unknown = [s for s in args.shapes or [] if s not in SHAPES]
    if unknown:
        raise CliError(f"unknown shape {unknown[0]!r}; allowed: {', '.join(SHAPES)}")
    data = run_kernel_benchmark(args.shapes, with_flex=not args.no_flex)
    write_json(data, args.out)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffattn", description="Sparse attention for diffusers DiT models.")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import DEMO_PATTERN, DEMO_PROMPT

    demo = sub.add_parser("demo", help="generate a video with the embedded demo pipeline",
                          description="Generate a short video with the embedded tiny Wan pipeline (trained on clips of "
                                      "coloured shapes: prompts like 'a red circle moving right') and sparse "
                                      "self-attention; writes MP4, GIF, a PNG of the frames and a JSON record.")
    demo.add_argument("--out", default="outputs/demo", help="output folder, default outputs/demo")
    demo.add_argument("--pattern", default=DEMO_PATTERN, help=f"attention pattern spec: {SPEC_FORMS}; default {DEMO_PATTERN}")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="text prompt")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the noise (and of the weights with --random-weights), default 0")
    demo.add_argument("--random-weights", action="store_true",
                      help="random DiT and VAE weights instead of the trained ones (the frames are noise)")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default 8)")
    demo.add_argument("--dense-steps", type=int, default=2, help="first N steps dense, default 2")
    demo.add_argument("--impl", choices=["auto", "triton", "reference"], default="auto", help="attention implementation")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser(
        "generate", help="generate videos or images with sparse attention",
        description="Generate one video or image per prompt with sparse self-attention and write it with a JSON "
                    "record (settings, seed, versions, timings, token grid, attended fraction) beside it. Without "
                    "--model the embedded tiny Wan pipeline runs: trained on clips of coloured shapes, it draws "
                    "prompts like 'a red circle moving right' (--random-weights: random weights, noise).")
    gen.add_argument("--prompt", help="text prompt (default: a demo prompt)")
    gen.add_argument("--prompts", metavar="FILE", help="file with one prompt per line: one output per prompt")
    gen.add_argument("--method", help=f"attention pattern spec: {SPEC_FORMS} (default: the preset's, else dense)")
    _add_generation_args(gen)
    gen.add_argument("--out", nargs="+", metavar="PATH",
                     help="output: a folder (default outputs/generate), or files by extension: .mp4 and/or .gif "
                          "for videos, .png for images (a contact sheet for videos); the JSON goes beside")
    gen.add_argument("--upscale", type=float, metavar="FACTOR",
                     help="training-free high resolution (FreeSwim): generate at the native size, upscale the "
                          "frames by FACTOR and refine them at FACTOR x the size with an inward sliding window "
                          "and a cached full-attention branch")
    gen.add_argument("--highres", metavar="CONFIG",
                     help="with --upscale: 'strength=0.7,guide_every=2,window=31x53,scale=auto,flow_shift=9,"
                          "attention=freeswim|window|dense,steps=N,interpolation=linear,store_dtype=bfloat16,"
                          "offload=true' (every key optional; defaults: FreeSwim's)")
    gen.add_argument("--ulysses", type=int, default=1, metavar="N",
                     help="diffusers' Ulysses context parallelism over N processes, one GPU each "
                          "(launch with 'torchrun --nproc-per-node N --no-python diffattn generate ... --ulysses N')")
    gen.add_argument("--ulysses-anything", action="store_true",
                     help="with --ulysses: allow token and head counts that N does not divide")
    gen.set_defaults(func=cmd_generate)

    cmp = sub.add_parser(
        "compare", help="dense vs sparse methods: speed, PSNR/SSIM, attention error, report",
        description="Run one prompt and seed through dense attention and each method; measure wall time and "
                    "speedup, PSNR and SSIM of the frames against dense, and the attention-level relative L1 error "
                    "on the dense run's q/k/v; write report.md, report.html, speed_quality.png and compare.json.")
    cmp.add_argument("--prompt", help="text prompt (default: a demo prompt)")
    cmp.add_argument("--methods", nargs="+", metavar="METHOD",
                     help=f"pattern specs ({SPEC_FORMS}) or preset names (default: window:3x5x5 radial:0.2 on the embedded "
                          "model, or the --preset's method)")
    _add_generation_args(cmp)
    cmp.add_argument("--attn-step", type=int, help="denoising step whose q/k/v are probed (default: the middle step)")
    cmp.add_argument("--repeats", type=int, default=1, help="timed runs per method (median), default 1")
    cmp.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs (2 steps per method)")
    cmp.add_argument("--out", default="outputs/compare", help="report folder, default outputs/compare")
    cmp.set_defaults(func=cmd_compare)

    show = sub.add_parser("show", help="draw a pattern's block layout", description="Print and draw the block layout of a pattern on a token grid.")
    show.add_argument("pattern", help=f"pattern spec: {SPEC_FORMS} (static patterns only: a dynamic one has no fixed layout)")
    show.add_argument("--grid", type=_grid, required=True, help="token grid FxHxW (video) or HxW (image)")
    show.add_argument("--text-len", type=int, default=0, help="text tokens in the sequence (dense), default 0")
    show.add_argument("--block", type=_block, help="kernel block sizes QxK, default 128x64 (a tiled window: the "
                                                   "largest that keep its tiles whole)")
    show.add_argument("--out", help=f"picture to write: {', '.join(PICTURE_SUFFIXES)}")
    show.add_argument("--no-progress", action="store_true", help="accepted for symmetry with generate; show has no progress bar")
    show.set_defaults(func=cmd_show)

    env = sub.add_parser("env", help="versions, GPU and which implementation runs", description="Print versions, the GPU and which attention implementation 'auto' picks and why.")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(func=cmd_env)

    bench = sub.add_parser("bench", help="benchmarks (GPU)", description="Benchmarks; results are written as JSON with the machine and versions.")
    bench.add_argument("what", choices=["kernels"], help="kernels: attention kernel vs SDPA, FlexAttention, xformers")
    bench.add_argument("--shapes", nargs="*", help="shapes to run (default: all)")
    bench.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    bench.add_argument("--out", default="bench-kernels.json", help="JSON output, default bench-kernels.json")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"diffattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


def module_main() -> int:
    """``python -m diffattn`` and ``python -m diffattn.cli`` (also under ``torchrun ... -m``).

    ``python -m`` puts the current directory first on ``sys.path``. The command imports nothing
    from there, but a folder there can shadow a package that diffusers or transformers import:
    from this repository's root, ``kernels/`` (installed as ``diffattn.kernels``) hides the PyPI
    ``kernels`` package (``cannot import name 'CUDAProperties' from 'kernels'``). So the entry is
    dropped before anything imports them, as ``python -P`` would; the ``diffattn`` console script
    never has it.
    """
    if not getattr(sys.flags, "safe_path", False) and sys.path and _is_current_directory(sys.path[0]):
        del sys.path[0]
        _warn_if_source_tree_not_installed()
    return main()


def _is_current_directory(entry) -> bool:
    try:
        return os.path.realpath(entry or os.curdir) == os.path.realpath(os.curdir)
    except (TypeError, ValueError):
        return False


def _warn_if_source_tree_not_installed() -> None:
    """``python -m`` from a source tree imports ``diffattn`` from it; ``diffattn.kernels`` and
    ``diffattn.pipelines`` then exist only if that tree is installed editable (``pip install -e .``)."""
    import importlib.util

    package = sys.modules.get("diffattn")
    here = os.path.realpath(os.curdir)
    if package is None or not any(os.path.realpath(p).startswith(here + os.sep) for p in package.__path__):
        return
    if importlib.util.find_spec("diffattn.pipelines") is None:
        print(f"diffattn: warning: diffattn was imported from the source tree in the current directory ({here}), "
              "which is not installed editable, so diffattn.kernels and diffattn.pipelines are missing: use the "
              "installed 'diffattn' command, run from another directory, or 'pip install -e .' here", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(module_main())
