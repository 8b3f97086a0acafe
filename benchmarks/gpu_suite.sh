#!/usr/bin/env bash
# The GPU suite (issues 5 and 6): one call on the lent GPU machine.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # on the GPU machine ($OUT is given there)
#   SMOKE=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh   # dry run on a CPU: interpreter tests, --smoke benches
#
# SUITE_SECONDS (default 480) is the whole run's budget: each step's limit is cut to what is left,
# so the call ends before the device tool's timeout and the bundle below always comes back.
# STEPS (default: all) names the steps after env to run, e.g. STEPS="tests e2e profile".
# Steps (each logged to NAME.log; a failed step does not stop the later ones, the exit code says
# whether all passed):
#   install   pip install -e . without dependencies (the machine is offline; torch, triton,
#             transformers are already there), plus the server's wheels from .whl/ if carried:
#             fastapi, starlette, pydantic(-core), annotated-types, typing-inspection,
#             typing-extensions, opentelemetry-api, uvicorn, fetched beforehand with
#             `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
#             manylinux2014_x86_64 -d .whl NAME==VERSION` (the versions the venv has; .whl/ is ignored)
#   env       GPU, driver, versions
#   tests     the kernel tests and the engine's kernel path on the GPU, plus the engine tests
#   e2e       benchmarks/bench_gpu_e2e.py     -> e2e-gpu.json (LLaVA-1.5-7B shapes, fp16)
#   profile   benchmarks/profile_gpu.py       -> profile-gpu.json (phase times, top kernels)
#   sweep     benchmarks/sweep_decode.py      -> sweep-decode-gpu.json (decode attention launch settings)
#   kernels   benchmarks/bench_kernels.py     -> kernels-gpu.json
#   serve     benchmarks/bench_serve.py       -> serve-gpu.json (issue 6: mid preset, fp16, HTTP sweep)
# The device tool returns at most 8 files, so the logs travel as $OUT/suite.tgz (rewritten after
# every step) beside the JSON files and summary.txt. Copy the JSON to benchmarks/results/ with the
# GPU name and date and summarise them in RESULTS.md.
set -u
OUT=${OUT:?set OUT to the folder for logs and JSON}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
BUDGET=${SUITE_SECONDS:-480}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0
summary=()

bundle() {
    printf '%s\n' "${summary[@]}" >"$OUT/summary.txt"
    cp "$OUT/summary.txt" "$WORK/"
    tar -czf "$OUT/suite.tgz.part" -C "$WORK" . && mv "$OUT/suite.tgz.part" "$OUT/suite.tgz"
}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case " wheels install env ${STEPS:-$name} " in
        *" $name "*) ;;
        *) summary+=("$name skipped: not in STEPS"); return ;;
    esac
    local left=$((BUDGET - SECONDS - 5))
    if [ "$left" -lt 10 ]; then
        summary+=("$name skipped: the suite's ${BUDGET}s budget is spent")
        status=1
        bundle
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$WORK/$name.log"
    summary+=("$name rc=$rc $((SECONDS - t0))s")
    [ "$rc" -eq 0 ] || status=1
    bundle
}

if [ "$SMOKE" = 1 ]; then
    bench_flag=(--smoke)
    suffix=cpu-smoke
    serve_flags=(--preset tiny --device cpu --concurrency 1 4 --requests 4 --max-tokens 8)
else
    bench_flag=()
    suffix=gpu
    serve_flags=(--preset mid --device cuda --dtype float16 --concurrency 1 4 16 64 --max-tokens 64)
    if ls .whl/*.whl >/dev/null 2>&1; then  # the server's packages, absent from the GPU image
        step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
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
nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1 || true
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rfE --junitxml="$WORK/tests.xml" \
    tests/test_kernels.py tests/test_kernels_model.py tests/test_engine.py
step e2e 200 "$PY" benchmarks/bench_gpu_e2e.py "${bench_flag[@]}" --out "$OUT/e2e-$suffix.json"
step profile 60 "$PY" benchmarks/profile_gpu.py "${bench_flag[@]}" --out "$OUT/profile-$suffix.json"
step sweep 90 "$PY" benchmarks/sweep_decode.py "${bench_flag[@]}" --out "$OUT/sweep-decode-$suffix.json"
step kernels 100 "$PY" benchmarks/bench_kernels.py "${bench_flag[@]}" --out "$OUT/kernels-$suffix.json"
step serve 150 "$PY" benchmarks/bench_serve.py "${serve_flags[@]}" --out "$OUT/serve-$suffix.json"

cat "$OUT/summary.txt"
exit $status
