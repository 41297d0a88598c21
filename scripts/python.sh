#!/usr/bin/env bash
# The Python package: builds the abi3 wheel (maturin, from PyPI, in a venv this script makes),
# installs it, runs its pytest tests and executes the quickstart notebook headlessly, checking
# that exact-match accuracy improves. Needs the model (./scripts/fetch_models.sh) and the CLI
# (cargo build --release), which ./scripts/test.sh provides first.
#
# The wheel is built for x86-64-v3 (AVX2, FMA), not for this CPU: it runs on any x86-64 CPU
# with AVX2, and the kernels pick AVX-512 and AMX at run time where the CPU has them.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LOWRANK_VENV:-.venv-python}
if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    echo "installing python3-venv (apt)" >&2
    (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null || sudo apt-get install -y -qq python3-venv >/dev/null
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.5,<2" numpy pytest nbclient nbformat ipykernel matplotlib openai
rm -rf target/wheels
RUSTFLAGS="-C target-cpu=x86-64-v3" CARGO_TARGET_DIR=target/python \
    "$venv/bin/maturin" build --quiet --release -m python/Cargo.toml --out target/wheels
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps target/wheels/lowrank-*.whl
"$venv/bin/python" -m pytest -q python/tests
"$venv/bin/python" tools/run_notebook.py examples/lora_quickstart.ipynb --out runs/notebook/lora_quickstart.ipynb
