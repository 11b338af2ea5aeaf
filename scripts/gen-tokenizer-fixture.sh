#!/usr/bin/env bash
# Regenerate the tokenizer reference fixtures with llama.cpp's `llama-tokenize`.
#
# Usage:
#   scripts/gen-tokenizer-fixture.sh [QWEN_GGUF] [SMOLLM2_GGUF]
#
# Reads  tests/fixtures/tokenizer/strings.json (a JSON array of strings) and
# writes tests/fixtures/tokenizer/qwen2.5-coder-0.5b-instruct.json and
# tests/fixtures/tokenizer/smollm2-135m-instruct.json, each:
#   {"model": NAME, "gguf_sha256": SHA, "llama_cpp": VERSION,
#    "cases": [{"text": STRING, "ids": [TOKEN_ID, ...]}, ...]}
#
# How each string is tokenized (see tools/tokenize/tokenize.cpp in llama.cpp):
#   -f FILE       the exact UTF-8 bytes of the string are written to FILE;
#                 tokenize.cpp re-reads -f files verbatim (std::ios::binary),
#                 so no trailing newline is added or stripped.
#   --no-escape   tokenize.cpp runs string_process_escapes() on the file
#                 contents unless this is given; without it a literal "\n"
#                 (backslash, n) in the text would become a newline.
#   --no-bos      do not add BOS (add_special=false, so no EOS/SEP either).
#   (default)     special tokens are parsed: the tokenize tool defaults
#                 parse_special to true (common/arg.cpp); we do not pass
#                 --no-parse-special.
#   --ids         print the ids as one "[1, 2, 3]" line on stdout.
#   --log-disable silence llama.cpp's logger.
#
# The llama.cpp binaries come from scripts/llama-cpp.sh (cached build).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

ERRAND_HOME="${ERRAND_HOME:-$HOME/.cache/errand}"
qwen_gguf="${1:-$ERRAND_HOME/models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf}"
smollm_gguf="${2:-$ERRAND_HOME/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"

fixtures="$root/tests/fixtures/tokenizer"
strings="$fixtures/strings.json"

for f in "$qwen_gguf" "$smollm_gguf" "$strings"; do
    [[ -f "$f" ]] || { echo "error: missing file: $f" >&2; exit 1; }
done
command -v python3 >/dev/null 2>&1 || { echo "error: python3 is required" >&2; exit 1; }

bin="$("$here/llama-cpp.sh" | tail -1)"
tokenize="$bin/llama-tokenize"
[[ -x "$tokenize" ]] || { echo "error: $tokenize not found" >&2; exit 1; }

# Keep in sync with LLAMA_CPP_VERSION in scripts/llama-cpp.sh.
llama_cpp_version="$(sed -n 's/^LLAMA_CPP_VERSION="\(.*\)"$/\1/p' "$here/llama-cpp.sh")"
[[ -n "$llama_cpp_version" ]] || { echo "error: cannot read LLAMA_CPP_VERSION" >&2; exit 1; }

python3 - "$tokenize" "$llama_cpp_version" "$strings" "$fixtures" \
    "qwen2.5-coder-0.5b-instruct=$qwen_gguf" \
    "smollm2-135m-instruct=$smollm_gguf" <<'PY'
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

tokenize, version, strings_path, out_dir, *models = sys.argv[1:]

with open(strings_path, encoding="utf-8") as f:
    strings = json.load(f)
if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
    sys.exit(f"error: {strings_path} must be a JSON array of non-empty strings")

IDS_LINE = re.compile(r"^\[(\s*-?\d+\s*(,\s*-?\d+\s*)*)?\]$")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_tokenize(gguf, text, tmp):
    with open(tmp, "wb") as f:
        f.write(text.encode("utf-8"))
    cmd = [tokenize, "-m", gguf, "-f", tmp,
           "--ids", "--no-bos", "--no-escape", "--log-disable"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit(f"error: llama-tokenize failed (rc={p.returncode}) for {text!r}:\n"
                 + p.stderr.decode("utf-8", "replace")[-2000:])
    lines = [l.strip() for l in p.stdout.decode("utf-8", "replace").splitlines()]
    ids_lines = [l for l in lines if IDS_LINE.match(l)]
    if len(ids_lines) != 1:
        sys.exit(f"error: expected exactly one id list in llama-tokenize output for {text!r}, got:\n"
                 + p.stdout.decode("utf-8", "replace"))
    ids = json.loads(ids_lines[0])
    if not ids:
        sys.exit(f"error: no tokens for non-empty text {text!r}")
    return ids


def dump(doc):
    # One case per line: diffable and reasonably compact.
    head = {k: v for k, v in doc.items() if k != "cases"}
    out = ["{"]
    for k, v in head.items():
        out.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    out.append('  "cases": [')
    cases = doc["cases"]
    for i, c in enumerate(cases):
        sep = "," if i + 1 < len(cases) else ""
        out.append("    " + json.dumps(c, ensure_ascii=False, separators=(", ", ": ")) + sep)
    out.append("  ]")
    out.append("}")
    return "\n".join(out) + "\n"


with tempfile.TemporaryDirectory(prefix="errand-tok-") as td:
    tmp = os.path.join(td, "text.bin")
    for spec in models:
        name, gguf = spec.split("=", 1)
        print(f"[gen-tokenizer-fixture] {name}: {len(strings)} strings ({gguf})", file=sys.stderr)
        cases = []
        for i, text in enumerate(strings):
            cases.append({"text": text, "ids": run_tokenize(gguf, text, tmp)})
            if (i + 1) % 25 == 0:
                print(f"[gen-tokenizer-fixture]   {i + 1}/{len(strings)}", file=sys.stderr)
        doc = {"model": name, "gguf_sha256": sha256(gguf), "llama_cpp": version, "cases": cases}
        # Round-trip sanity check of our own writer.
        text = dump(doc)
        assert json.loads(text) == doc
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"[gen-tokenizer-fixture] wrote {path}", file=sys.stderr)
PY
