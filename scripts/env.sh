# Sourced by the other scripts: picks a Rust toolchain that satisfies the
# crate's rust-version and keeps build outputs outside the clone, so repeat
# runs (and CI on the same machine) start warm.
#
#   ERRAND_HOME       default ~/.cache/errand (models, downloads, llama.cpp build)
#   CARGO_TARGET_DIR  default $ERRAND_HOME/target

export ERRAND_HOME="${ERRAND_HOME:-$HOME/.cache/errand}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ERRAND_HOME/target}"

errand_need=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
# True when version $1 >= the crate's rust-version.
errand_version_ok() { printf '%s\n%s\n' "$errand_need" "$1" | sort -V -C; }
errand_rustc_version() { "$@" --version 2>/dev/null | awk '{print $2}' | sed 's/-.*//'; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not installed; install Rust $errand_need or newer (https://rustup.rs)" >&2
  return 1 2>/dev/null || exit 1
fi
if [ -z "${RUSTUP_TOOLCHAIN:-}" ] && ! errand_version_ok "$(errand_rustc_version rustc)"; then
  # The default toolchain is too old: use an installed one that is new enough
  # (stable first, nightly only if nothing else satisfies it).
  for tc in $(rustup toolchain list 2>/dev/null | awk '{print $1}' | sort -r | sort -s -t- -k1,1 | grep -v nightly; rustup toolchain list 2>/dev/null | awk '{print $1}' | grep nightly); do
    if errand_version_ok "$(errand_rustc_version rustup run "$tc" rustc)"; then
      export RUSTUP_TOOLCHAIN="$tc"
      echo "note: default rustc is older than $errand_need; using toolchain $tc" >&2
      break
    fi
  done
  if [ -z "${RUSTUP_TOOLCHAIN:-}" ]; then
    echo "error: Errand needs Rust $errand_need or newer; run: rustup toolchain install stable" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
