#!/usr/bin/env bash
# Throughput benchmark on a GPU machine: LeNet-300-100 populations of K = 1, 8, 64 on the GPU, and
# the convnet rows (Conv-2, ResNet-20; lth against a bare jitted step, with the segment strategy
# auto picks and the other one, so the check shows whether "scan" is right on the GPU too). The
# PyTorch reference and the numpy peak stay on the CPU, as on a laptop.
#
#   bash benchmarks/gpu.sh                 # extra arguments go to throughput.py, e.g. --quick
#
# Installs jax's CUDA plugin (jax[cuda12], the same version as the installed jax) when jax sees no
# GPU; that needs pip to reach an index or a wheel folder (PIP_FIND_LINKS). torch is optional.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lth from this checkout, installed or not

has_gpu() { python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; }

if ! has_gpu; then
    ver=$(python -c 'import jax; print(jax.__version__)' 2>/dev/null || true)
    echo "jax sees no GPU; installing jax[cuda12]${ver:+==$ver}" >&2
    pip install -q "jax[cuda12]${ver:+==$ver}" || { echo "pip install jax[cuda12] failed (no index reachable?)" >&2; exit 1; }
    has_gpu || { echo "jax still sees no GPU after installing jax[cuda12]; is a CUDA driver present (nvidia-smi)?" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c 'import jax; print("jax", jax.__version__, jax.devices())'
python benchmarks/throughput.py --population 1,8,64 --conv --conv-steps 40 "$@"
