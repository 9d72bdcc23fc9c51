"""No register spills inside the kernels' loops at the specializations the package launches.

Compiles for sm_90 with Triton's bundled ptxas (no GPU needed) through
``diffattn.bench.spills`` and reads ptxas's report and the SASS. bf16 with text padding is the
superset of each kernel's paths (fp16 allocates the same registers; without text padding is a
subset), at head dims 64 and 128. Runs in a subprocess because TRITON_INTERPRET=1 (set by
conftest) makes every ``@triton.jit`` function interpreted.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    from dataclasses import asdict
    from diffattn.bench.spills import compile_resources, runtime_specializations

    wanted = [s for s in runtime_specializations()
              if s.dtype in ("bf16", "fp32") and ("text_lens" in s.label or s.label.split()[0] in ("merge", "selection"))]
    print(json.dumps([asdict(compile_resources(s)) for s in wanted]))
''')



@pytest.fixture(scope="module")
def resources():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_runtime_kernel_is_compiled(resources):
    kernels = {r["kernel"] for r in resources}
    assert kernels == {"block_sparse_attn_fwd_kernel", "block_sparse_partials_fwd_kernel", "piecewise_attn_fwd_kernel",
                       "merge_partials_fwd_kernel", "block_pool_fwd_kernel", "block_select_fwd_kernel"}
    assert {r["constexprs"].get("HEAD_DIM") for r in resources} == {64, 128}


def test_no_spills_inside_loops(resources):
    over = [(r["label"], r["loop_spills"]) for r in resources if r["loop_spills"]]
    assert not over, over


def test_no_spills_at_all_where_the_kernel_fits(resources):
    """Kernels that fit their registers entirely: merge, selection, Piecewise at D = 64 and every
    attention / partials kernel at D = 64 (8 warps)."""
    fits = [r for r in resources if r["label"].split()[0] in ("merge", "selection")
            or ("D=64" in r["label"] and r["label"].split()[0] in ("attention", "partials", "piecewise"))]
    assert fits
    spilled = [(r["label"], r["spill_stores"], r["spill_loads"]) for r in fits if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
