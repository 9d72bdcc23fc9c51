#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, kernel tuning sweep, kernel benchmark.
# Usage (from the project root, wheels from ../shared/tools/gpu-wheels.sh in .whl/):
#   bash benchmarks/gpu_run.sh [tests] [tune] [bench] [selection] [step-cache] [highres]      results go to $OUT (or ./gpu-results)
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl && export PYTHONPATH="$HOME/site"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
if ! (cd /tmp && python3 -c "import diffattn.kernels"); then  # fall back to an assembled copy
  rm -rf "$HOME/pkg" && mkdir -p "$HOME/pkg" && cp -r diffattn "$HOME/pkg/" && cp -r kernels "$HOME/pkg/diffattn/kernels" && cp -r pipelines "$HOME/pkg/diffattn/pipelines"
  export PYTHONPATH="$HOME/site:$HOME/pkg"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
steps=${*:-tests tune bench}
for step in $steps; do
  case $step in
    tests) python3 -m pytest tests/test_kernel_cuda.py tests/test_partials_cuda.py -q -p no:logging ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/gpu-tests.log" 2>&1; grep -E "passed|failed|Error" "$OUT/gpu-tests.log" | tail -15 ;;
    diagnose) python3 benchmarks/diagnose_partial.py 2>&1 | tee "$OUT/diagnose.log" ;;
    alltests) python3 -m pytest tests -q 2>&1 | tail -30 | tee "$OUT/gpu-tests.log" ;;
    tune) python3 benchmarks/tune_kernel.py --out "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" ;;
    bench) python3 -m diffattn.cli bench kernels --out "$OUT/bench-kernels.json" 2>&1 | tee "$OUT/bench.log" ;;
    selection) python3 benchmarks/selection_bench.py --out "$OUT/selection.json" 2>&1 | tee "$OUT/selection.log" ;;
    step-cache) python3 benchmarks/step_cache_bench.py --out "$OUT/step-cache-bench.json" 2>&1 | tee "$OUT/step-cache-bench.log" ;;
    highres) python3 benchmarks/highres_bench.py --out "$OUT/highres.json" 2>&1 | tee "$OUT/highres.log" ;;
    bench-noflex) python3 -m diffattn.cli bench kernels --no-flex --out "$OUT/bench-kernels.json" 2>&1 | tee "$OUT/bench.log" ;;
  esac
done
