#!/usr/bin/env bash
# Errand's test suite, from a fresh clone: picks a toolchain, fetches the
# test models and the embedding model (verified by sha256), then runs every test. The tokenizer and
# template fixtures are committed; their generators are in scripts/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python3 models/fetch.py smollm2-135m-instruct qwen2.5-coder-0.5b-instruct all-minilm-l6-v2
# The top-level modules must not import each other in a cycle.
python3 scripts/modgraph.py
# No test may depend on the day it runs: errand panics on any read of the
# machine's clock in this process tree (tests pin a world::Clock instead).
export ERRAND_DENY_WALL_CLOCK=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Unit and integration tests (the crate has no doc tests).
# --no-fail-fast: one red unit test must not hide the integration results.
cargo test --locked --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "all tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
