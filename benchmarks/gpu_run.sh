#!/usr/bin/env bash
# One call on a GPU machine (about 9 minutes on an H100/H200): install, the CUDA tests, the kernel
# benchmark, the selection / Piecewise, step-cache and host-overhead benchmarks; one merged JSON and one log.
#
# Usage (from the project root, diffusers wheels from ../shared/tools/gpu-wheels.sh in .whl/):
#   bash benchmarks/gpu_run.sh                 # the default steps below, in order
#   bash benchmarks/gpu_run.sh tests bench-wan # chosen steps
# Results go to $OUT (default ./gpu-results): gpu-run.json (every step's JSON, the machine, the
# versions, the date, each step's exit status and seconds), gpu-run.log, gpu-tests.log.
# Each step runs under its own time limit, so one slow step cannot take the others' time.
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
WORK=$(mktemp -d); LOG="$OUT/gpu-run.log"; : > "$LOG"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl \
  && export PYTHONPATH="$HOME/site" || echo "wheel install failed" | tee -a "$LOG"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed" | tee -a "$LOG"
if ! (cd /tmp && python3 -c "import diffattn.kernels"); then  # fall back to an assembled copy
  rm -rf "$HOME/pkg" && mkdir -p "$HOME/pkg" && cp -r diffattn "$HOME/pkg/" && cp -r kernels "$HOME/pkg/diffattn/kernels" \
    && cp -r pipelines "$HOME/pkg/diffattn/pipelines"
  export PYTHONPATH="$HOME/site:$HOME/pkg"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"

# The CUDA tests are bound by Triton compiling each specialization on the CPU: five groups run
# side by side (about 140 s cold on an H200 machine's 16 cores; one process took over 4 minutes).
run_cuda_tests() {
  local dyn=tests/test_dynamic_kernels_cuda.py rc=0 pids=() log
  local pytest="python3 -m pytest -q -p no:logging -p no:cacheprovider -rfE"
  $pytest tests/test_kernel_cuda.py > "$WORK/tests-1.log" 2>&1 & pids+=($!)
  $pytest tests/test_partials_cuda.py $dyn -k "partials or tiled or merge" > "$WORK/tests-2.log" 2>&1 & pids+=($!)
  $pytest $dyn -k "selection_kernel" > "$WORK/tests-3.log" 2>&1 & pids+=($!)
  $pytest $dyn -k "dynamic_attention and bfloat16" > "$WORK/tests-4.log" 2>&1 & pids+=($!)
  $pytest $dyn -k "dynamic_attention and not bfloat16" > "$WORK/tests-5.log" 2>&1 & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for log in "$WORK"/tests-*.log; do echo "## $log"; cat "$log"; done > "$OUT/gpu-tests.log"
  grep -hE "passed|failed|error" "$WORK"/tests-*.log
  return $rc
}
# step -> time limit (s) and command; JSON-writing steps write $WORK/<step>.json
declare -A LIMIT=([tests]=160 [bench-wan]=50 [bench-hunyuan768]=95 [bench-flux]=45 [selection]=100 [step-cache]=60 [host]=45
                  [bench-hunyuan720]=80 [highres]=200 [tune]=200 [alltests]=400)
run_step() {
  case $1 in
    tests) run_cuda_tests ;;
    alltests) python3 -m pytest tests -q -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1; rc=$?; tail -30 "$OUT/gpu-tests.log"; return $rc ;;
    bench-wan) python3 -m diffattn.cli bench kernels --shapes wan-1.3b-480p-81f --out "$WORK/$1.json" ;;
    bench-hunyuan768) python3 -m diffattn.cli bench kernels --shapes hunyuan-768p-117f --out "$WORK/$1.json" ;;
    bench-flux) python3 -m diffattn.cli bench kernels --shapes flux-1024 --out "$WORK/$1.json" ;;
    bench-hunyuan720) python3 -m diffattn.cli bench kernels --no-flex --shapes hunyuan-720p-129f --out "$WORK/$1.json" ;;
    selection) python3 benchmarks/selection_bench.py --out "$WORK/$1.json" ;;
    step-cache) python3 benchmarks/step_cache_bench.py --out "$WORK/$1.json" ;;
    host) python3 benchmarks/host_overhead.py --out "$WORK/$1.json" ;;
    highres) python3 benchmarks/highres_bench.py --out "$WORK/$1.json" ;;
    tune) python3 benchmarks/tune_kernel.py --out "$WORK/$1.json" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}
steps=${*:-tests bench-wan bench-hunyuan768 bench-flux selection step-cache host}
: > "$WORK/steps.tsv"
for step in $steps; do
  echo "=== $step (limit ${LIMIT[$step]:-120} s)" | tee -a "$LOG"
  start=$(date +%s)
  # the step runs in a subshell under `timeout`: a hung or slow step is killed, the rest still run
  export -f run_step run_cuda_tests; export OUT WORK
  timeout -k 5 "${LIMIT[$step]:-120}" bash -c "run_step $step" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$step" "$rc" "$(( $(date +%s) - start ))" | tee -a "$WORK/steps.tsv"
done
python3 - "$WORK" "$OUT/gpu-run.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), sys.argv[2]
record = {"steps": [], "results": {}}
for line in (work / "steps.tsv").read_text().splitlines():
    step, rc, seconds = line.split("\t")
    record["steps"].append({"step": step, "exit_status": int(rc), "seconds": int(seconds)})
    path = work / f"{step}.json"
    if path.exists():
        record["results"][step] = json.loads(path.read_text())
try:
    from diffattn.bench.kernels import environment
    record["environment"] = environment()
except Exception as exc:  # the results matter more than the environment record
    record["environment"] = {"error": repr(exc)}
pathlib.Path(out).write_text(json.dumps(record, indent=1))
print("wrote", out, [(s["step"], s["exit_status"], s["seconds"]) for s in record["steps"]])
EOF
