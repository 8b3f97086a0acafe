#!/usr/bin/env bash
# The GPU suite (issues 5 and 6): one call on the lent GPU machine (give it 540 s; the serve
# step comes last, so a slow machine loses only that one).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # on the GPU machine ($OUT is given there)
#   SMOKE=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh   # dry run on a CPU: interpreter tests, --smoke benches
#
# Steps (each with its own time limit, each logged to $OUT/NAME.log; a failed step does not stop
# the later ones, the exit code says whether all passed):
#   install   pip install -e . without dependencies (the machine is offline; torch, triton,
#             transformers are already there)
#   env       GPU, driver, versions
#   tests     the kernel tests and the engine's kernel path on the GPU, plus the engine tests
#   kernels   benchmarks/bench_kernels.py     -> $OUT/kernels-gpu.json
#   e2e       benchmarks/bench_gpu_e2e.py     -> $OUT/e2e-gpu.json (LLaVA-1.5-7B shapes, fp16)
#   serve     benchmarks/bench_serve.py       -> $OUT/serve-gpu.json (issue 6: mid preset, fp16, HTTP sweep)
# Copy the JSON files to benchmarks/results/ with the date and summarise them in RESULTS.md.
set -u
OUT=${OUT:?set OUT to the folder for logs and JSON}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
status=0
summary=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    summary+=("$name rc=$rc $((SECONDS - t0))s")
    [ "$rc" -eq 0 ] || status=1
}

if [ "$SMOKE" = 1 ]; then
    bench_flag=(--smoke)
    suffix=cpu-smoke
    serve_flags=(--preset tiny --device cpu --concurrency 1 4 --requests 4 --max-tokens 8)
else
    bench_flag=()
    suffix=gpu
    serve_flags=(--preset mid --device cuda --dtype float16 --concurrency 1 4 16 64)
    step install 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
step env 30 "$PY" -c "
import torch, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError: print('triton missing')
import transformers; print('transformers', transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, 'cc', f'{p.major}.{p.minor}', 'mem GiB', round(p.total_memory / 2**30, 1), 'SMs', p.multi_processor_count)
"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
step tests 200 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_kernels.py tests/test_kernels_model.py tests/test_engine.py
step kernels 120 "$PY" benchmarks/bench_kernels.py "${bench_flag[@]}" --out "$OUT/kernels-$suffix.json"
step e2e 240 "$PY" benchmarks/bench_gpu_e2e.py "${bench_flag[@]}" --out "$OUT/e2e-$suffix.json"
step serve 150 "$PY" benchmarks/bench_serve.py "${serve_flags[@]}" --out "$OUT/serve-$suffix.json"

printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
