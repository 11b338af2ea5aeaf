#!/usr/bin/env bash
# The load campaign (issue 23): ERRAND_LOAD_SESSIONS users (default 200), each
# on its own WebSocket session, chat with one server for ERRAND_LOAD_SECONDS
# (default 600), SmolLM2 standing in for the model. Prints turns, inputs shed
# with `busy`, the wait for a reply to start (p50, p99) and RSS after warm-up
# and at the end; fails on any protocol error, a user never served, or RSS
# growing more than 10% (in runs of a minute or more). Bounded: it stops by
# itself. CI runs the same test with 24 users for 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export ERRAND_LOAD_SESSIONS="${ERRAND_LOAD_SESSIONS:-200}" ERRAND_LOAD_SECONDS="${ERRAND_LOAD_SECONDS:-600}"
python3 models/fetch.py smollm2-135m-instruct >/dev/null
cargo test --locked --test integration many_sessions_chat_at_once -- --nocapture 2>&1 | grep -E '^load|panicked|test result'
