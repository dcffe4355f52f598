#!/usr/bin/env bash
# Issue 14's one device run, prepared so a session lent a GPU spends its 15 minutes measuring:
# the `gpu` tests, then the GPU benchmarks (three runs each), everything under $OUT (the device tool's
# folder that comes back) or else bench/results/gpu/. About 5-8 minutes on an H200.
#
#   make gpu-wheels    # here, first: the service core's wheels the device image lacks, in .whl/
#   then the device tool: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
#   and, if it says the round benchmark had no time left, at once (the machine stays warm
#   about 30 s): run(command="bash bench/gpu_run.sh round", carry=[".whl"], timeout_s=300)
#
# The device image has python3 (3.12) with a CUDA torch, pytest, numpy, safetensors and tqdm, and
# no BentoML or pydantic: .whl/ brings pydantic, orjson and redis for tests/test_gpu_service.py
# (the engine and its rounds in process; nothing there needs BentoML). Copy what comes back into
# bench/results/ (model_bench-cuda.json is the README's GPU table) and commit it.
set -u
part=${1:-all}  # all: tests, model_bench, then round_bench in what time is left; round: it alone
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} >"$out/gpu_env.txt" 2>&1
cat "$out/gpu_env.txt"

if [ "$part" = all ]; then
# The gpu tests first (each writes what failed); a failure does not stop the benchmark.
timeout 200 "$py" -m pytest -p no:cacheprovider -q -rs -m gpu \
    tests/test_graphed.py tests/test_lstm.py tests/test_native.py tests/test_gpu_service.py \
    2>&1 | tee "$out/gpu_tests.txt"

# The benchmark: the served and the wide shape, eager / graphed engine / cuDNN, 3 runs.
timeout 330 "$py" bench/model_bench.py --device cuda --runs 3 --record 2>&1 | tee "$out/model_bench-cuda.txt"
cp bench/results/model_bench-cuda.json "$out/" 2>/dev/null || echo "no model_bench-cuda.json"
fi

# Then, in what is left of 550 s: a round of the service's steps in process (bench/round_bench.py:
# eager, the graphed engine alone, the round's graphed steps), 3 runs; its table and JSON are
# written after each run, so a timeout keeps the runs done.
left=$((550 - SECONDS))
if [ "$left" -gt 60 ]; then
    timeout "$left" "$py" bench/round_bench.py --device cuda --runs 3 --budget 1.0 --record 2>&1 \
        | tee "$out/round_bench-cuda.txt"
    cp bench/results/round_bench-cuda.json "$out/" 2>/dev/null || echo "no round_bench-cuda.json"
else
    echo "no time left for bench/round_bench.py ($left s): run 'bash bench/gpu_run.sh round' next"
fi
