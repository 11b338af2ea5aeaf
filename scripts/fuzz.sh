#!/usr/bin/env bash
# The fuzzing campaign (issue 23): a million mutated inputs through the
# parsers that read what others write (WebSocket frames, OpenAI requests,
# manifests, dialogue YAML, the model's tool calls and commands), 0 panics
# expected. Bounded: it stops by itself after ERRAND_FUZZ_INPUTS inputs.
# CI runs the same test with 12,000 inputs.
#
#   scripts/fuzz.sh                 # 1,000,000 inputs, seed 23
#   ERRAND_FUZZ_INPUTS=5000000 ERRAND_FUZZ_SEED=7 scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export ERRAND_FUZZ_INPUTS="${ERRAND_FUZZ_INPUTS:-1000000}"
cargo test --locked --test integration fuzz_the_parsers -- --nocapture 2>&1 | grep -E '^fuzz |panicked|test result'
