#!/usr/bin/env bash
# Run HERE (a machine with the network), once per checkout, before the accelerator check is run on a GPU machine
# that reaches nothing: fills workdirs/accelerator_carry/ (ignored by git, under /workdirs/) with
#   whl/   the wheels (Python 3.12, manylinux x86-64) of this package's dependencies that the GPU image lacks
#          (its python3 has jax, flax, optax, orbax, torch, tensorboard, scikit-learn, ... but not these);
#   data/  the two files of configs/retention.py:quick (PneumoniaMNIST, the H&E tiles; about 12 MB);
#   git_commit.json  the commit the check reports (the GPU machine gets the working tree without .git).
# Then name workdirs/accelerator_carry in the run's `carry` (benchmarks/README.md, "The accelerator check").
set -euo pipefail
cd "$(dirname "$0")/.."
dest=workdirs/accelerator_carry
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
mkdir -p "$dest/whl" "$dest/data/xray" "$dest/data/pathology"
rm -f "$dest"/whl/*.whl
# The versions this checkout is tested with (.venv); each one alone (--no-deps), its needs named here too.
wheels=(ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 dm-tree==0.1.10 clu==0.0.12
        jax_privacy==2.0.0 dp-accounting==0.6.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5)
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest/whl" "${wheels[@]}"
src=${INVCOSS_SHARED_DATA:-../shared/data}
cp "$src/README.md" "$dest/data/"
cp "$src/xray/pneumoniamnist.npz" "$dest/data/xray/"
cp "$src/pathology/he_tiles_64px.npz" "$dest/data/pathology/"
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
modified=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)
printf '{"commit": "%s", "modified_tracked_files": %s, "recorded": "%s"}\n' "$commit" "$modified" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$dest/git_commit.json"
ls "$dest/whl"
du -sh "$dest"
