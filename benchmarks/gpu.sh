#!/usr/bin/env bash
# nlref on CuPy against PyTorch on CUDA, on a machine with an NVIDIA GPU.
#
# Run from the repository root. Needs CuPy, PyTorch (CUDA build) and array-api-compat;
# nlref itself is used from this checkout. Where array-api-compat is not installed and
# there is no network, put its wheel in .whl/ first (on a machine with network:
#   pip download --no-deps -d .whl array-api-compat==1.16.0).
# Results: the table on stdout and benchmarks/results/cupy-<date>.{txt,json} (and .png with
# --scaling); with $OUT set, a copy of them there too.
set -euo pipefail
if ! python3 -c "import array_api_compat" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/nlref-site .whl/array_api_compat-*.whl
    export PYTHONPATH="/tmp/nlref-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/run.py --backend cupy "$@"
if [ -n "${OUT:-}" ]; then
    cp "$(ls -t benchmarks/results/cupy-*.json | head -1)" "$OUT/bench-cupy.json"
    cp "$(ls -t benchmarks/results/cupy-*.txt | head -1)" "$OUT/bench-cupy.txt"
    case " $* " in
        *" --scaling "*) cp "$(ls -t benchmarks/results/cupy-*.png | head -1)" "$OUT/bench-cupy.png" ;;
    esac
fi
