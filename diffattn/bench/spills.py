"""Registers and spills of every kernel at the specializations the package launches, without a GPU.

Triton compiles each kernel for a GPU target (default sm_90, the H100 / H200) and runs its
bundled ``ptxas`` with ``-v``, as a launch on that GPU would; the log gives the registers per
thread, the spill stores / loads (bytes) and the stack frame. Spills are local-memory traffic
inside the kernel: on a GPU they cost bandwidth and latency. A spill outside the loops runs once
per program (a few bytes per thread); one inside a loop runs on every key block, so the
report also counts the spill instructions that sit inside a loop of the SASS (``in loops``,
from the ``nvdisasm`` Triton bundles). The target is zero in loops everywhere.

    python -m diffattn.bench.spills                 # table of every runtime specialization
    python -m diffattn.bench.spills --out spills.json

Must run with ``TRITON_INTERPRET`` unset (the interpreter compiles nothing). The specializations
mirror the launches in ``kernels/ops.py`` and ``kernels/block_selection.py``: head dims 64 and
128, bf16 and fp16, with and without text padding, each kernel's block sizes and launch
configuration (``launch_config``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import re
import sys
from dataclasses import asdict, dataclass, field

POINTER_DTYPES = {  # pointer arguments that are not int32 index tensors: "io" = q / k / v / out dtype
    "Q": "io", "K": "io", "V": "io", "Out": "io", "OutIn": "io", "OutEx": "io", "Out1": "io", "Out2": "io", "X": "io",
    "Lse": "fp32", "LseIn": "fp32", "LseEx": "fp32", "Lse1": "fp32", "Lse2": "fp32", "LseOut": "fp32",
    "Mean": "fp32", "Sim": "fp32", "QMean": "fp32", "KMean": "fp32", "QSim": "fp32", "KSim": "fp32",
    "VSum": "fp32", "Size": "fp32", "HMat": "fp32", "HNorm": "fp32", "LowU": "fp32", "LowW": "fp32",
    "ApxShare": "fp32", "Keep": "i8",
}
SCALARS_FP32 = {"qk_scale", "cdf", "scale", "similarity", "sm_scale", "first_order_norm"}


@dataclass
class Specialization:
    """One compiled variant of a kernel: its constexprs and launch configuration."""

    module: str  # module under diffattn.kernels
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    dtype: str = "bf16"
    label: str = ""


@dataclass
class Resources:
    kernel: str
    label: str
    dtype: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    loop_spills: int = 0  # spill instructions (STL / LDL) inside a loop of the SASS
    constexprs: dict = field(default_factory=dict)


def runtime_specializations() -> list[Specialization]:
    """The kernel variants ``diffattn.attention`` / ``attention_partials`` / ``merge_partials`` /
    ``select_blocks`` launch for head dims 64 and 128 in bf16 and fp16."""
    from ..kernels import kernel_block_size, launch_config

    specs = []
    for head_dim in (64, 128):
        block_q, block_k = kernel_block_size(head_dim)
        config = launch_config(head_dim, None)
        for dtype in ("bf16", "fp16"):
            for text_lens in (False, True):
                base = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_q, BLOCK_N=block_k, DILATED=False,
                            PACKED_COORDS=True, HAS_TEXT_LENS=text_lens, UPCAST=False, DOT_PRECISION="tf32")
                tag = f"D={head_dim} {dtype}{' text_lens' if text_lens else ''}"
                for kind, name in ((0, "blocks"), (1, "window")):
                    for external in (False, True) if kind == 1 else (False,):
                        specs.append(Specialization(
                            "block_sparse_attention", "block_sparse_attn_fwd_kernel",
                            dict(base, MASK_KIND=kind, EXTERNAL=external), config["num_warps"], config["num_stages"],
                            dtype, f"attention {name}{' external' if external else ''} {tag}"))
                    specs.append(Specialization(
                        "block_sparse_attention", "block_sparse_partials_fwd_kernel", dict(base, MASK_KIND=kind),
                        config["num_warps"], config["num_stages"], dtype, f"partials {name} {tag}"))
                specs += piecewise_specializations(head_dim, dtype, text_lens, tag)
            specs.append(Specialization("merge_partials", "merge_partials_fwd_kernel",
                                        dict(HEAD_DIM=head_dim, BLOCK_R=max(1, min(64, 4096 // head_dim)),
                                             BLOCK_D=head_dim), 4, 3, dtype, f"merge D={head_dim} {dtype}"))
            specs.append(Specialization("block_selection", "block_pool_fwd_kernel",
                                        dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK=64, CHUNK=64, SIMILARITY=True),
                                        4, 3, dtype, f"selection pooling D={head_dim} {dtype}"))
        for block_nk, block_i, warps in ((512, 16, 8), (2048, 4, 8)):  # Wan 480p / 720p key blocks of 64
            for mode in (0, 1):
                specs.append(Specialization(
                    "block_selection", "block_select_fwd_kernel",
                    dict(HEAD_DIM=head_dim, BLOCK_I=block_i, BLOCK_NK=block_nk, MODE=mode, KEEP_DIAGONAL=True,
                         KEEP_SINK=True, SIMILARITY=True), warps, 3, "fp32",
                    f"selection {'top-k' if mode == 0 else 'cdf'} NK<={block_nk} D={head_dim}"))
    return specs


def piecewise_specializations(head_dim: int, dtype: str, text_lens: bool, tag: str) -> list[Specialization]:
    """Piecewise's launches (``kernels/ops.py`` ``piecewise_attention``), one per first-order term."""
    import torch

    from ..kernels.ops import piecewise_launch

    TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    specs = []
    for first_order, name in ((0, "order 0"), (1, "pooled / shared"), (3, "lowrank 4")):  # 1 and 2: one kernel
        constexprs, warps, stages = piecewise_launch(head_dim, 64, first_order, 4 if first_order == 3 else 1,
                                                     text_lens, TORCH_DTYPES[dtype], interpreter=False)
        specs.append(Specialization("piecewise_attention", "piecewise_attn_fwd_kernel", constexprs, warps, stages,
                                    dtype, f"piecewise {name} {tag}"))
    return specs


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_resources(spec: Specialization, arch: int = 90) -> Resources:
    """Compile one specialization for ``sm_<arch>`` and read ptxas's resource report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(f"diffattn.kernels.{spec.module}"), spec.kernel)
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in POINTER_DTYPES:
            kind = POINTER_DTYPES[name]
            signature[name] = "*" + (spec.dtype if kind == "io" else kind)
        elif name in SCALARS_FP32:
            signature[name] = "fp32"
        else:
            signature[name] = "*i32" if name[0].isupper() else "i32"
    log = io.StringIO()
    was = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=spec.constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = was
    text = log.getvalue()
    regs, spills, stack = _PTXAS.findall(text), _SPILLS.findall(text), _STACK.findall(text)
    if not regs:
        raise RuntimeError(f"no ptxas resource report for {spec.label}:\n{text[-2000:]}")
    stores, loads = (int(spills[-1][0]), int(spills[-1][1])) if spills else (0, 0)
    in_loops = loop_spill_instructions(compiled.asm["cubin"]) if stores or loads else 0
    return Resources(spec.kernel, spec.label, spec.dtype, int(regs[-1]), stores, loads,
                     int(stack[-1]) if stack else 0, int(compiled.metadata.shared), in_loops, dict(spec.constexprs))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*)")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\(\.(L_x_\d+)\)")
_SPILL = re.compile(r"\b(STL|LDL)(\.\w+)*\b")


def loop_spill_instructions(cubin: bytes) -> int:
    """Spill instructions (``STL`` / ``LDL``) inside a loop: between a backward branch and its
    target in the SASS (``nvdisasm``, bundled with Triton). Spills outside loops run once per
    program; these run once per iteration."""
    import os
    import subprocess
    import tempfile

    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True, check=True).stdout
    labels, instructions, pending = {}, [], []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            address = int(m.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            instructions.append((address, m.group(2)))
    loops = [(labels[b.group(1)], address) for address, text in instructions
             if (b := _BRANCH.search(text)) and labels.get(b.group(1), address + 1) <= address]
    return sum(1 for address, text in instructions
               if _SPILL.search(text) and any(lo <= address <= hi for lo, hi in loops))


def main(argv=None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write (default: print only)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10, default 90 (H100 / H200)")
    parser.add_argument("--only", action="append",
                        help="compile the labels containing this substring (repeatable; default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    rows = []
    for spec in runtime_specializations():
        if args.only and not any(part in spec.label for part in args.only):
            continue
        r = compile_resources(spec, args.arch)
        rows.append(r)
        print(f"{r.label:<46} regs {r.registers:3d}  spill stores {r.spill_stores:5d} B  loads {r.spill_loads:5d} B"
              f"  in loops {r.loop_spills:2d}  stack {r.stack:4d} B  shared {r.shared:6d} B", flush=True)
    if args.out:
        import datetime
        import platform

        import triton

        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "triton": triton.__version__, "arch": f"sm_{args.arch}", "python": platform.python_version(),
                  "results": [asdict(r) for r in rows]}
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
