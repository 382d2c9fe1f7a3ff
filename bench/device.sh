#!/usr/bin/env bash
# Every GPU check that issues #13 and #23 ask for, in one run of a few minutes on a lent GPU
# machine (docs/performance.md, "On a GPU"):
#
#   here:   make device-wheels      # .whl/: the wheels that machine lacks (bench/device_wheels.py)
#   there:  bash bench/device.sh    # the device tool's run, carrying .whl
#
# 1. bench/gpu.py: resnet50 at 224 px on 12,000 generated JPEGs through every data path,
#    with DataLoader workers: auto and 8, against the ceiling (one batch held on the GPU).
# 2. bench/pipeline.py on the same JPEGs: the four stages fine-tuning resnet50 from a local
#    weights file (the head on frozen features, then the whole net), with the data held on
#    the GPU and streamed by `workers: auto`; then the served model loaded on the GPU by
#    mlflow.pyfunc.load_model, against imgpipe-predict.
# Each table is also written to $OUT, so it comes back even if the call runs out of time.
# MODEL, SIZE and IMAGES change the work (MODEL=resnet18 SIZE=32 IMAGES=300 to try it on a CPU),
# WHEELS the wheel folder and PYTHON the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-resnet50} SIZE=${SIZE:-224} IMAGES=${IMAGES:-12000}
out=${OUT:-/tmp/imgpipe-device}
site=$(mktemp -d /tmp/imgpipe-site-XXXX)
mkdir -p "$out"

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader

status=0
"$PYTHON" bench/gpu.py --model "$MODEL" --sizes "$SIZE" --images "$IMAGES" --workers 8 \
  --dir /tmp/imgpipe-gpu 2>&1 | tee "$out/gpu.txt" || status=1
"$PYTHON" bench/pipeline.py --model "$MODEL" --size "$SIZE" --raw /tmp/imgpipe-gpu/data/raw \
  --dir /tmp/imgpipe-pipeline 2>&1 | tee "$out/pipeline.txt" || status=1
echo; echo "== the two tables again, without the progress bars"
sed 's/.*\r//' "$out/gpu.txt" | tail -n 10
sed 's/.*\r//' "$out/pipeline.txt" | tail -n 8
exit $status
