"""Every kernel lowers to GPU code (sm_90 cubin) in compiled mode within an H100's shared memory,
without a GPU.

The interpreter tests run the kernels' semantics; this checks what only the compiler sees
(types of loop-carried values, constexpr branches, shared memory). It runs in a subprocess
because TRITON_INTERPRET=1 (set by conftest) makes every ``@triton.jit`` function interpreted.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import importlib
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bsa = importlib.import_module("diffattn.kernels.block_sparse_attention")
    merge = importlib.import_module("diffattn.kernels.merge_partials")
    piecewise = importlib.import_module("diffattn.kernels.piecewise_attention")
    selection = importlib.import_module("diffattn.kernels.block_selection")
    POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "OutIn": "*bf16", "OutEx": "*bf16",
                "Out1": "*bf16", "Out2": "*bf16", "Lse": "*fp32", "LseIn": "*fp32", "LseEx": "*fp32",
                "Lse1": "*fp32", "Lse2": "*fp32", "LseOut": "*fp32", "qk_scale": "fp32", "X": "*bf16",
                "Mean": "*fp32", "Sim": "*fp32", "QMean": "*fp32", "KMean": "*fp32", "QSim": "*fp32",
                "KSim": "*fp32", "Keep": "*i8", "VSum": "*fp32", "Size": "*fp32", "HMat": "*fp32",
                "HNorm": "*fp32", "LowU": "*fp32", "LowW": "*fp32", "ApxShare": "*fp32", "cdf": "fp32", "scale": "fp32",
                "similarity": "fp32", "sm_scale": "fp32", "first_order_norm": "fp32"}
    H100_SHARED = 232448  # bytes of shared memory one block may use on an H100

    def compile_for_h100(kernel, constexprs, num_warps=8, num_stages=3):
        params = inspect.signature(kernel.fn).parameters
        signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "*i32" if n[0].isupper() else "i32")
                     for n in params}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        assert compiled.asm["cubin"], kernel.fn.__name__
        assert compiled.metadata.shared <= H100_SHARED, (kernel.fn.__name__, constexprs, compiled.metadata.shared)
        print(kernel.fn.__name__, constexprs.get("MASK_KIND"), "shared", compiled.metadata.shared)

    base = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, DILATED=True, PACKED_COORDS=True,
                HAS_TEXT_LENS=True, UPCAST=False, DOT_PRECISION="tf32")
    for kind in (0, 1):
        compile_for_h100(bsa.block_sparse_partials_fwd_kernel, dict(base, MASK_KIND=kind))
    compile_for_h100(bsa.block_sparse_attn_fwd_kernel, dict(base, MASK_KIND=1, EXTERNAL=True))
    compile_for_h100(merge.merge_partials_fwd_kernel, dict(HEAD_DIM=128, BLOCK_R=32, BLOCK_D=128))
    # Piecewise as ops.py launches it (block 64): pooled, and low rank 4
    import torch
    from diffattn.kernels.ops import piecewise_launch
    for first_order, rank in ((1, 1), (3, 4)):
        constexprs, warps, stages = piecewise_launch(128, 64, first_order, rank, True, torch.bfloat16, False)
        compile_for_h100(piecewise.piecewise_attn_fwd_kernel, constexprs, warps, stages)
    # the selection kernels at Wan 720p's 1,182 key blocks of 64 tokens
    compile_for_h100(selection.block_pool_fwd_kernel,
                     dict(HEAD_DIM=128, BLOCK_D=128, BLOCK=64, CHUNK=64, SIMILARITY=True), 4, 2)
    compile_for_h100(selection.block_select_fwd_kernel,
                     dict(HEAD_DIM=128, BLOCK_I=4, BLOCK_NK=2048, MODE=0, KEEP_DIAGONAL=True, KEEP_SINK=True,
                          SIMILARITY=True), 8, 2)
''')


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared") == 8, result.stdout
