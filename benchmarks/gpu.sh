#!/usr/bin/env bash
# One command for a GPU machine: the speed benchmark on CUDA (and CPU) and the full quality table.
#   bash benchmarks/gpu.sh OUT_DIR [FMNIST_ROOT]
# Installs nothing: uses the python3 it finds (or $PYTHON), which must have torch with CUDA plus this project's
# dependencies (deepspeed, webdataset, hydra-core, tensorboard, tqdm). Fashion-MNIST's four idx .gz files must be
# in FMNIST_ROOT (default /usr/share/datasets/fashion-mnist). Everything it writes goes under OUT_DIR.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [FMNIST_ROOT]}
fmnist=${2:-${FMNIST_ROOT:-/usr/share/datasets/fashion-mnist}}
py=${PYTHON:-$(command -v python3)}
cd "$(dirname "$0")/.."
mkdir -p "$out"
"$py" - <<'PY' || { echo "gpu.sh: CUDA is not available to $py (no torch, or torch.cuda.is_available() is False); run it on a GPU machine" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
[ -f "$fmnist/train-images-idx3-ubyte.gz" ] || [ -f "$fmnist/train-images-idx3-ubyte" ] \
  || { echo "gpu.sh: no Fashion-MNIST idx files in $fmnist; pass their folder as the second argument" >&2; exit 2; }
"$py" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$out/device.txt"
start=$(date +%s)
"$py" benchmarks/speed.py --device auto --out "$out/speed.json" 2>&1 | tee "$out/speed.log"
"$py" benchmarks/quality.py --device cuda --raw-root "$fmnist" --data-root "$out/data" --out-dir "$out/quality" \
  2>&1 | tee "$out/quality.log"
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $out (speed.json, quality/quality.md, quality/quality.json)"
