#!/usr/bin/env bash
# One command for a lent GPU (benchmarks/gpu.py): every benchmark's GPU
# configuration, then Omniglot MAML, the meta-learning comparison, the
# fine-tuning paradigms and prevent-forgetting, within 560 s; one JSON and
# its markdown tables in benchmarks/results/gpu_<UTC>.{json,md}.
#
#   bash benchmarks/gpu.sh --prepare   # here (tfds + raw data): .gpu_data/
#   bash benchmarks/gpu.sh             # on the device; carry .gpu_data
#   bash benchmarks/gpu.sh --tiny      # CPU check of the same pipeline
#
# Other arguments go to `python -m benchmarks.gpu` (--help). Where $OUT is
# set (a device call), the JSON, the markdown and the parts' logs are copied
# there, so that they come back.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -m benchmarks.gpu "$@"
rc=$?
case " $* " in *" --prepare "*) exit $rc ;; esac
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  latest=$(ls -t benchmarks/results/gpu_*.json 2>/dev/null | head -n 1)
  if [ -n "$latest" ]; then
    cp "$latest" "${latest%.json}.md" "$OUT"/ 2>/dev/null
  fi
  tar -czf "$OUT/gpu_logs.tar.gz" runs/gpu/*/log.txt 2>/dev/null
fi
exit $rc
