#!/usr/bin/env bash
# The accelerator check on a GPU machine (benchmarks/accelerator_check.py; options pass through):
#   bash benchmarks/accelerator_check.sh [--budget=420] [...]
# Installs the carried wheels of benchmarks/accelerator_prep.sh (workdirs/accelerator_carry/whl) into a
# temporary folder, points $INVCOSS_SHARED_DATA at the carried data, and runs the check with the machine's
# python3 (or $PYTHON; .venv/bin/python where this checkout has one). The JSON goes to $OUT/accelerator_check.json
# where $OUT is set, else benchmarks/results/accelerator_check_<platform>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=workdirs/accelerator_carry
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
# Only where the package's dependencies are missing (the GPU image); a checkout's own environment is left alone.
if compgen -G "$carry/whl/*.whl" > /dev/null && \
   ! "$py" -c "import ml_collections, grain, clu, jax_privacy" > /dev/null 2>&1; then
  site=${TMPDIR:-/tmp}/invcoss_carried_site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$carry"/whl/*.whl || { echo "accelerator_check.sh: installing $carry/whl failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${INVCOSS_SHARED_DATA:-}" ] && [ -f "$carry/data/README.md" ]; then
  export INVCOSS_SHARED_DATA="$PWD/$carry/data"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package (not installed there)
export PYTHONUNBUFFERED=1
exec "$py" benchmarks/accelerator_check.py "$@"
