#!/usr/bin/env bash
# The full test suite: notebooks/library sync, docs freshness, notebook tests, pytest, the GPU check in smoke mode.
# Run from an environment where the package is installed with its dev extra (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# the real 700-image Imagenette subset lives beside the repository (../shared/data), as in CI
if [ -z "${FASTAI_RANGER_MINI:-}" ] && [ -d ../shared/data/imagenette2-160-mini ]; then
  FASTAI_RANGER_MINI="$(cd ../shared/data/imagenette2-160-mini && pwd)"; export FASTAI_RANGER_MINI
fi

snapshot() { find nbs fastai_ranger -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha1sum; }
echo "== 1/5 notebooks and library in sync (nbdev-clean, nbdev-export change nothing)"
before=$(snapshot)
nbdev-clean
nbdev-export
after=$(snapshot)
if [ "$before" != "$after" ]; then
  diff <(echo "$before") <(echo "$after") || true
  echo "FAIL: notebooks and library out of sync: nbdev-clean/nbdev-export changed the files above." >&2
  echo "      Edit the notebooks in nbs/ (never fastai_ranger/*.py), then run nbdev-clean && nbdev-export and commit." >&2
  exit 1
fi
echo "in sync"

echo "== 2/5 README.md and docs/ rendered from the current notebooks"
python tools/make_docs.py --check

echo "== 3/5 notebook tests (nbdev-test; flags skipped: notest slow cuda)"
nbdev-test --timing

echo "== 4/5 pytest"
python -m pytest tests -ra --durations=15

echo "== 5/5 GPU check in smoke mode (benchmarks/gpu_check.py on the CPU, tiny sizes: the GPU command cannot rot)"
smoke_out="$(mktemp -d)"
python benchmarks/gpu_check.py --smoke --out "$smoke_out" ${FASTAI_RANGER_MINI:+--data "$FASTAI_RANGER_MINI"}
