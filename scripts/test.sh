#!/usr/bin/env bash
# Errand's test suite, from a fresh clone: picks a toolchain, fetches the two
# test models (verified by sha256), then runs every test. The tokenizer and
# template fixtures are committed; their generators are in scripts/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python3 models/fetch.py smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
cargo test --locked "$@"
