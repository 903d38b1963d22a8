#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): extraction fp16/bf16 batch>1 vs batch 1, a forced
# out-of-memory back-off, categorize/lens on the GPU, compress latency; then the writer
# benchmark at a small size. A few minutes on a GPU machine; on a CPU-only machine it runs
# the CPU parts and says which GPU parts it skipped.
#
#   benchmarks/gpu_check.sh              # from the repository root, in the project's environment
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "| CUDA devices:", torch.cuda.device_count())
PY
"$PY" benchmarks/gpu_check.py "$@"
echo "--- writer throughput (4 images; benchmarks/writer_throughput.py --images N to scale) ---"
"$PY" benchmarks/writer_throughput.py --images 4 --repeat 1
