#!/usr/bin/env bash
# The chaos campaign (issue 23): ERRAND_CHAOS_FLOWS food orders (default 100)
# against `errand serve` and `errand sandbox` as separate processes, each flow
# with a kill -9 of the server, the sandbox or both at a random moment, then
# a restart on the same data; the client resumes and finishes the flow as the
# SDK would. Afterwards the client's payments, the trades, the wallet's
# ledger, the merchant's orders and the server's order book must agree:
# 0 lost, 0 duplicated. Qwen2.5-Coder-0.5B reads the messages. Bounded: each
# flow gives up after 40 inputs or 10 minutes. CI runs the same test with 3.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export ERRAND_CHAOS_FLOWS="${ERRAND_CHAOS_FLOWS:-100}"
python3 models/fetch.py qwen2.5-coder-0.5b-instruct >/dev/null
cargo test --locked --test integration order_flows_survive_kill_9 -- --nocapture 2>&1 | grep -E '^chaos|panicked|assert|test result'
