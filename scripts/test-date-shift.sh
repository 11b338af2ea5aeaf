#!/usr/bin/env bash
# Shows that no test depends on the machine's date: builds the tests, then
# runs every test binary as it is and again under libfaketime with the
# machine's clock moved by each offset given (default: a day and a month),
# and compares test by test. Exits non-zero if any outcome differs.
#
#   scripts/test-date-shift.sh            # +1d and +31d
#   scripts/test-date-shift.sh +7d -365d
#
# cargo and rustc hang under libfaketime, so only the built test binaries
# run under it (with what they start: errand sandbox and Python; not the
# browser, see below).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
[ $# -gt 0 ] || set -- +1d +31d
if ! command -v faketime >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq faketime; } >/dev/null 2>&1 \
    || { echo "error: faketime is missing and could not be installed; install Debian's faketime package" >&2; exit 1; }
fi
export ERRAND_DENY_WALL_CLOCK=1
python3 models/fetch.py smollm2-135m-instruct qwen2.5-coder-0.5b-instruct all-minilm-l6-v2 >/dev/null
mapfile -t bins < <(cargo test --locked --all-targets --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p')
[ ${#bins[@]} -gt 0 ] || { echo "error: found no test binaries" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # label, then the command prefix
  local label=$1; shift
  for b in "${bins[@]}"; do
    # A binary that hangs (as cargo does under libfaketime) is stopped.
    timeout 3600 "$@" "$b" 2>&1 | tee -a "$out/$label.log" >/dev/null || true
  done
  grep -E '^test .* \.\.\. (ok|FAILED|ignored.*)$' "$out/$label.log" | sed 's/^test //' | sort >"$out/$label.results" || true
  [ -s "$out/$label.results" ] || { echo "error: $label ran no test (see its log above)" >&2; cat "$out/$label.log" >&2; exit 1; }
  echo "$label: $(grep -c ' ok$' "$out/$label.results") passed, $(grep -c ' FAILED$' "$out/$label.results") failed"
  return 0
}
run now env
differs=0
for off in "$@"; do
  # Chromium and Playwright's node stop delivering page events under
  # libfaketime (seen at +1d and +31d: page.goto timed out on a page that
  # had rendered). Skipping them by name has not kept them out yet, so the
  # browser test is the one known difference; the page compares times on
  # the server's clock (client.serverNow()).
  run "$off" env FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_SKIP_CMDS=node,chromium,chrome_crashpad_handler faketime -f "$off"
  if ! diff -u "$out/now.results" "$out/$off.results"; then
    differs=1
  fi
done
if [ $differs -ne 0 ]; then
  echo "outcomes differ with the machine's date moved" >&2
  exit 1
fi
echo "same outcome for every test with the machine's date moved by: $*"
