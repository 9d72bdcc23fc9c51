"""The block-sparse kernels lower to GPU code (sm_90 cubin) in compiled mode, without a GPU.

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
    POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "OutIn": "*bf16", "OutEx": "*bf16",
                "Out1": "*bf16", "Out2": "*bf16", "Lse": "*fp32", "LseIn": "*fp32", "LseEx": "*fp32",
                "Lse1": "*fp32", "Lse2": "*fp32", "LseOut": "*fp32", "qk_scale": "fp32"}

    def compile_for_h100(kernel, constexprs):
        params = inspect.signature(kernel.fn).parameters
        signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "*i32" if n[0].isupper() else "i32")
                     for n in params}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
        assert compiled.asm["cubin"], kernel.fn.__name__
        print(kernel.fn.__name__, constexprs.get("MASK_KIND"), "shared", compiled.metadata.shared)

    base = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, DILATED=True, PACKED_COORDS=True,
                HAS_TEXT_LENS=True, UPCAST=False, DOT_PRECISION="tf32")
    for kind in (0, 1):
        compile_for_h100(bsa.block_sparse_partials_fwd_kernel, dict(base, MASK_KIND=kind))
    compile_for_h100(bsa.block_sparse_attn_fwd_kernel, dict(base, MASK_KIND=1, EXTERNAL=True))
    compile_for_h100(merge.merge_partials_fwd_kernel, dict(HEAD_DIM=128, BLOCK_R=32, BLOCK_D=128))
''')


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared") == 4, result.stdout
