#!/usr/bin/env bash
# The GPU paths on a real GPU, one command, one line per check (every part has a time limit,
# 8 minutes in all on one GPU):
#
#   scripts/gpu_check.sh            # from the repository, with the package and its gpu extra installed
#
# 1. the CuPy variants of the image-operation tests (pytest -m gpu; a skip counts as a failure
#    here, since CuPy and a GPU must be present);
# 2. scripts/gpu_check.py: CPU vs GPU preprocessing of one shard; 60 training steps with bf16
#    autocast (images/s); SIGUSR1 mid-training, then the resume; embed, cluster (refinement and
#    ML2D stage) and export on CUDA vs the CPU with the same encoder (labels ARI >= 0.95);
#    throughput of preprocess, train, embed and the ML2D E-step; peak GPU memory.
# Without a CUDA device it stops at once with "no CUDA device" (exit status 2). Exit status 1
# when a check fails. docs/gpu.md says what each line means.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing checked; run this on a GPU machine"
    exit 2
fi
"$PY" -c "import torch; print(f'gpu_check: device: INFO {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}')"

status=0
out=$(timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_imageops.py tests/test_ctf.py \
      tests/test_preprocess.py tests/test_augment.py tests/test_backend.py 2>&1)
rc=$?
summary=$(tail -n 1 <<<"$out")
if [[ $rc == 0 ]] && ! grep -q "skipped" <<<"$summary"; then
    echo "gpu_check: cupy-tests: PASS $summary"
else
    echo "gpu_check: cupy-tests: FAIL (exit $rc) $summary"
    tail -n 30 <<<"$out" | sed 's/^/    /'
    status=1
fi

timeout 330 "$PY" scripts/gpu_check.py --device cuda "$@"
rc=$?
if [[ $rc == 124 ]]; then echo "gpu_check: python-checks: FAIL time limit (330 s)"; fi
((rc != 0)) && status=1
exit $status
