#!/usr/bin/env bash
# The slow- and broken-client campaign (issue 23): ERRAND_ATTACKERS (default
# 32) of each kind — a socket that stops reading, one that half-closes, an
# upgrade sent a byte at a time, a streamed API reply nobody reads — while
# another user chats. Every one of that user's replies must finish; the time
# to its first token is printed before and during the attack. Bounded: the
# attack ends with the test. CI runs the same test with 4 of each.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export ERRAND_ATTACKERS="${ERRAND_ATTACKERS:-32}"
python3 models/fetch.py smollm2-135m-instruct >/dev/null
cargo test --locked --test integration slow_and_broken_clients -- --nocapture 2>&1 | grep -E '^slow clients|panicked|test result'
