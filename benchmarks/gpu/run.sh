#!/bin/sh
# The GPU kit's one command, from the repository root of a checkout that has .whl/ beside it
# (sh benchmarks/gpu/fetch_wheels.sh): installs the wheels into a scratch folder, then times.
#   sh benchmarks/gpu/run.sh                      # both tables: SD3-Medium shape, then tiny-text
#   sh benchmarks/gpu/run.sh [bench.py arguments]  # one table
set -e
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/keras_sd3_gpu_site .whl/*.whl
    export PYTHONPATH=/tmp/keras_sd3_gpu_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [ $# -gt 0 ]; then
    exec python3 benchmarks/gpu/bench.py "$@"
fi
python3 benchmarks/gpu/bench.py --json gpu-sd3m.json || true
python3 benchmarks/gpu/bench.py --shape tiny-text --size 64 --steps 8 --dtype float32 --json gpu-tiny-text.json
