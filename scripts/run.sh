#!/usr/bin/env bash
# Fetch the default model and the embedding model, build Errand in release mode, and start the
# server (chat page, WebSocket, OpenAI-compatible API; the sandbox
# mini-programs run in-process). Arguments go to `errand` instead, e.g.
# scripts/run.sh chat --lang zh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python3 models/fetch.py qwen2.5-coder-0.5b-instruct all-minilm-l6-v2
cargo build --release --locked
if [ $# -eq 0 ]; then set -- serve; fi
exec "$CARGO_TARGET_DIR/release/errand" "$@"
