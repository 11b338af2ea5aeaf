#!/usr/bin/env bash
# Installs what the headless browser test (tests/browser/order_food.mjs)
# needs on a fresh Debian machine, idempotently and quietly:
#
#   * Debian's `chromium` package (only when /usr/bin/chromium is missing;
#     sudo is used only when not running as root), or whatever $CHROMIUM
#     already points at;
#   * `playwright-core` (an exact, pinned version) installed with npm into
#     $ERRAND_NODE_DIR (default: $HOME/.cache/errand/node).
#
# Usage:
#   node_dir=$(scripts/browser-deps.sh | tail -1)
#   ERRAND_NODE_DIR=$node_dir node tests/browser/order_food.mjs "$URL" shots/
#
# The last line on stdout is the node dir; progress goes to stderr.
set -euo pipefail

PLAYWRIGHT_CORE_VERSION="1.65.1"
ERRAND_NODE_DIR="${ERRAND_NODE_DIR:-${ERRAND_HOME:-$HOME/.cache/errand}/node}"

log() { printf '[browser-deps] %s\n' "$*" >&2; }
die() { printf '[browser-deps] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# --- Chromium ---------------------------------------------------------------
chromium_bin="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium_bin" ]; then
    log "chromium present: $chromium_bin"
else
    command -v apt-get >/dev/null 2>&1 || die "no $chromium_bin and no apt-get; install Chromium and set CHROMIUM"
    log "installing chromium with apt-get (this takes a minute)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >/dev/null
    as_root apt-get install -y -qq --no-install-recommends chromium fonts-noto-cjk >/dev/null \
        || die "apt-get install chromium failed"
    [ -x /usr/bin/chromium ] || die "chromium installed but /usr/bin/chromium is missing"
    chromium_bin=/usr/bin/chromium
fi
log "$("$chromium_bin" --version 2>/dev/null || echo "chromium (version unknown)")"

# --- playwright-core ----------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node is not installed (need Node.js 18 or newer)"
command -v npm >/dev/null 2>&1 || die "npm is not installed"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || die "Node.js $(node --version) is too old; need 18 or newer"

pkg_json="$ERRAND_NODE_DIR/node_modules/playwright-core/package.json"
have=""
if [ -f "$pkg_json" ]; then
    have=$(node -p "require(process.argv[1]).version" "$pkg_json" 2>/dev/null || true)
fi
if [ "$have" = "$PLAYWRIGHT_CORE_VERSION" ]; then
    log "playwright-core $have present in $ERRAND_NODE_DIR"
else
    log "installing playwright-core@$PLAYWRIGHT_CORE_VERSION into $ERRAND_NODE_DIR"
    mkdir -p "$ERRAND_NODE_DIR"
    if [ ! -f "$ERRAND_NODE_DIR/package.json" ]; then
        printf '{\n  "name": "errand-browser-test",\n  "private": true\n}\n' >"$ERRAND_NODE_DIR/package.json"
    fi
    # playwright-core downloads no browsers on install; we use the system one.
    (cd "$ERRAND_NODE_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install \
        --no-audit --no-fund --silent --loglevel=error --save-exact \
        "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null) \
        || die "npm install playwright-core@$PLAYWRIGHT_CORE_VERSION failed"
    have=$(node -p "require(process.argv[1]).version" "$pkg_json")
    log "playwright-core $have installed"
fi

echo "$ERRAND_NODE_DIR"
