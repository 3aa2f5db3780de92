#!/usr/bin/env bash
# One borrowed GPU machine, one call (../shared/device-kit/README.md): unpack the device kit,
# run the GPU benchmark and the decode-deviation check on CUDA, and leave what they wrote
# under $OUT (at most 8 files come back: the logs and Ray Data's logs go as one archive).
#
#   device run: bash benchmarks/gpu_session.sh   (carry: [".devkit"], timeout_s ~540)
#   GPU_BENCH_TIMEOUT=seconds for the benchmark (420); GPU_BENCH_ARGS=more of its arguments;
#   DEVIATION=0 skips the deviation check; TRAIN=1 also runs the training benchmark
#   (train_throughput.py --device cuda, ~150 s: lower GPU_BENCH_TIMEOUT to fit the call).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devkit/*.whl \
    || { echo "device kit did not install"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
{ nvidia-smi; nproc; free -g; python3 -c 'import torch, torchvision, timm, ray; print(torch.__version__, torchvision.__version__, timm.__version__, ray.__version__)'; } \
    > "$OUT/machine.txt" 2>&1
WORK=/tmp/vfb
timeout "${GPU_BENCH_TIMEOUT:-420}" python3 benchmarks/gpu_throughput.py \
    --workdir "$WORK" --photos-dir /tmp/vfb-photos --vitflow-timeout 150 ${GPU_BENCH_ARGS:-} \
    2>&1 | tee "$OUT/gpu.log"
if [ "${DEVIATION:-1}" = 1 ]; then
    timeout 75 python3 benchmarks/decode_deviation.py --device cuda --sizes 800x600 4032x3024 \
        --count 8 2>&1 | tee "$OUT/deviation.log"
fi
if [ "${TRAIN:-0}" = 1 ]; then
    timeout "${TRAIN_TIMEOUT:-150}" python3 benchmarks/train_throughput.py --device cuda \
        --workdir /tmp/vft 2>&1 | tee "$OUT/train.log"
fi
cp "$WORK"/results/*.json "$OUT/" 2>/dev/null
# vitflow's logs, job files, manifests and Ray Data's per-operator logs of each run.
tar czf "$OUT/runs.tgz" -C "$WORK" gpu 2>/dev/null
ls -la "$OUT"
