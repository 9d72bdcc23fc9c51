"""The ``diffattn`` command line."""

from __future__ import annotations

import argparse
import json
import sys


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


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
                 dense_steps=args.dense_steps, steps=args.steps, impl=args.impl)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_show(args) -> int:
    from .block_layout import build_block_layout
    from .patterns import parse_pattern
    from .tokens import TokenLayout

    try:
        pattern = parse_pattern(args.pattern)
        layout = TokenLayout(args.grid, text_len=args.text_len)
        blocks = build_block_layout(pattern, args.grid, *args.block)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    print(f"{pattern}\n{layout}: attends {pattern.density(layout):.2%} of token pairs")
    print(blocks)
    if max(blocks.num_q_blocks, blocks.num_k_blocks) <= 64:
        print(blocks.render())
    if args.out:
        blocks.draw(args.out, title=f"{args.pattern} on {'x'.join(map(str, args.grid))}: computed {blocks.block_density:.1%}")
        print(f"wrote {args.out}")
    return 0


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
    parser = argparse.ArgumentParser(prog="diffattn", description="Sparse attention for diffusers DiT models.")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import DEMO_PATTERN, DEMO_PROMPT

    demo = sub.add_parser("demo", help="generate a video with the embedded demo pipeline",
                          description="Generate a short video with the embedded tiny Wan pipeline (random weights: the "
                                      "frames are noise) and sparse self-attention; writes MP4, GIF, a PNG of the "
                                      "frames and a JSON record.")
    demo.add_argument("--out", default="outputs/demo", help="output folder, default outputs/demo")
    demo.add_argument("--pattern", default=DEMO_PATTERN, help=f"attention pattern, default {DEMO_PATTERN}")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="text prompt")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise, default 0")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default 8)")
    demo.add_argument("--dense-steps", type=int, default=2, help="first N steps dense, default 2")
    demo.add_argument("--impl", choices=["auto", "triton", "reference"], default="auto", help="attention implementation")
    demo.set_defaults(func=cmd_demo)

    show = sub.add_parser("show", help="draw a pattern's block layout", description="Print and draw the block layout of a pattern on a token grid.")
    show.add_argument("pattern", help="pattern, e.g. 'window:3x9x9', 'window:*x8x8,stride=1x2x2', 'radial:0.2', 'dense'")
    show.add_argument("--grid", type=_grid, required=True, help="token grid FxHxW (video) or HxW (image)")
    show.add_argument("--text-len", type=int, default=0, help="text tokens in the sequence (dense), default 0")
    show.add_argument("--block", type=_block, default=(128, 64), help="kernel block sizes QxK, default 128x64")
    show.add_argument("--out", help="PNG file to write")
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


if __name__ == "__main__":
    sys.exit(main())
