#!/usr/bin/env python3
"""Generate chat-template golden files for Errand's template tests.

Each case in tests/fixtures/templates/cases.json is rendered with the chat
template stored in each model's GGUF file (metadata key
`tokenizer.chat_template`). Rendering uses Python jinja2 set up the way
Hugging Face transformers' `apply_chat_template` sets it up (checked against
transformers 5.23.0, `transformers/utils/chat_template_utils.py` and
`transformers/tokenization_utils_base.py`):

  * `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
    extensions=[jinja2.ext.loopcontrols])` (HF also loads its
    `{% generation %}` extension, which these templates never use);
  * a `tojson` filter that is
    `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
    sort_keys=sort_keys)`, so by default ", " / ": " separators, no HTML
    escaping, non-ASCII kept as is;
  * globals `raise_exception(msg)` (raises TemplateError), `strftime_now(fmt)`,
    and HF's restricted `dict` and `namespace`;
  * render variables `messages`, `tools` (None when a case has `"tools": null`),
    `documents` (None), `add_generation_prompt`, plus the special tokens
    (`bos_token`, `eos_token`, and `unk_token` / `pad_token` / ... when the
    GGUF names them) as strings;
  * message keys whose value is null are dropped before rendering, as
    transformers 5 does.

Outputs, for each model:
  tests/fixtures/templates/<model>/chat_template.jinja   template exactly as stored
  tests/fixtures/templates/<model>/special_tokens.json   the special-token variables passed
  tests/fixtures/templates/<model>/<case>.txt            rendered string, byte for byte
                                                         (UTF-8, nothing added)
  tests/fixtures/templates/<model>/<case>.error          instead of .txt when rendering
                                                         raised: "<ExceptionType>: <message>"
                                                         (no trailing newline)

How to run (from the repository root; Python 3.8+):

    pip install jinja2==3.1.6
    python3 scripts/gen-template-golden.py [QWEN_GGUF [SMOLLM2_GGUF]]

The jinja2 version is pinned to 3.1.6 (the oldest that transformers 5 accepts)
and the script refuses to run with any other, so that goldens stay reproducible.
GGUF metadata is read with the small reader below; no other package is needed.
Only generation needs Python; the tests only read the written files.
"""

import argparse
import json
import os
import struct
import sys
from datetime import datetime

JINJA2_VERSION = "3.1.6"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "templates")
MODELS_DIR = os.path.expanduser("~/.cache/errand/models")
DEFAULT_MODELS = [
    (
        "qwen2.5-coder-0.5b-instruct",
        os.path.join(MODELS_DIR, "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct.gguf"),
    ),
    (
        "smollm2-135m-instruct",
        os.path.join(MODELS_DIR, "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
]

# Special-token attributes transformers passes to templates (SPECIAL_TOKENS_ATTRIBUTES),
# mapped to the GGUF metadata key holding each token's id.
SPECIAL_TOKEN_KEYS = [
    ("bos_token", "tokenizer.ggml.bos_token_id"),
    ("eos_token", "tokenizer.ggml.eos_token_id"),
    ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ("sep_token", "tokenizer.ggml.seperator_token_id"),  # sic: llama.cpp's spelling
    ("pad_token", "tokenizer.ggml.padding_token_id"),
    ("cls_token", "tokenizer.ggml.cls_token_id"),
    ("mask_token", "tokenizer.ggml.mask_token_id"),
]


# --------------------------------------------------------------------------
# Minimal GGUF metadata reader
# --------------------------------------------------------------------------

# GGUF value types -> struct format of the scalar
_SCALAR_FORMATS = {
    0: "<B",   # UINT8
    1: "<b",   # INT8
    2: "<H",   # UINT16
    3: "<h",   # INT16
    4: "<I",   # UINT32
    5: "<i",   # INT32
    6: "<f",   # FLOAT32
    7: "<?",   # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def exact(self, n):
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError("unexpected end of GGUF file")
        return data

    def unpack(self, fmt):
        return struct.unpack(fmt, self.exact(struct.calcsize(fmt)))[0]

    def raw_string(self, len_fmt):
        return self.exact(self.unpack(len_fmt))

    def value(self, vtype, len_fmt):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _TYPE_STRING:
            # Strings are kept as raw bytes so the template can be written back exactly.
            return self.raw_string(len_fmt)
        if vtype == _TYPE_ARRAY:
            elem_type = self.unpack("<I")
            count = self.unpack(len_fmt)
            return [self.value(elem_type, len_fmt) for _ in range(count)]
        raise ValueError("unknown GGUF value type %d" % vtype)


def read_gguf_metadata(path):
    """Return {key: value} for all metadata key/values (strings as bytes)."""
    with open(path, "rb") as f:
        r = _Reader(f)
        if r.exact(4) != b"GGUF":
            raise ValueError("%s: not a GGUF file" % path)
        version = r.unpack("<I")
        # Version 1 used 32-bit counts and string lengths, later versions 64-bit.
        len_fmt = "<I" if version == 1 else "<Q"
        r.unpack(len_fmt)  # tensor count
        kv_count = r.unpack(len_fmt)
        meta = {}
        for _ in range(kv_count):
            key = r.raw_string(len_fmt).decode("utf-8")
            vtype = r.unpack("<I")
            meta[key] = r.value(vtype, len_fmt)
        return meta


# --------------------------------------------------------------------------
# jinja2 environment mirroring transformers' _cached_compile_jinja_template
# --------------------------------------------------------------------------

def make_environment():
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    "Chat templates cannot store underscore-prefixed attributes on a namespace, but got %r." % name
                )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


# --------------------------------------------------------------------------


def load_model(path):
    meta = read_gguf_metadata(path)
    if "tokenizer.chat_template" not in meta:
        raise SystemExit("%s: no tokenizer.chat_template in metadata" % path)
    template_bytes = meta["tokenizer.chat_template"]
    tokens = meta.get("tokenizer.ggml.tokens", [])
    special = {}
    for name, key in SPECIAL_TOKEN_KEYS:
        if key in meta:
            token_id = meta[key]
            if not 0 <= token_id < len(tokens):
                raise SystemExit("%s: %s=%d is outside the vocabulary" % (path, key, token_id))
            special[name] = tokens[token_id].decode("utf-8")
    return template_bytes, special


def clean_message(message):
    # transformers 5: "Normalize: drop the keys whose value is None."
    return {k: v for k, v in message.items() if v is not None}


def main():
    parser = argparse.ArgumentParser(description="Render chat-template golden files (see module docstring).")
    parser.add_argument("qwen_gguf", nargs="?", default=DEFAULT_MODELS[0][1])
    parser.add_argument("smollm2_gguf", nargs="?", default=DEFAULT_MODELS[1][1])
    args = parser.parse_args()

    import jinja2

    if jinja2.__version__ != JINJA2_VERSION:
        raise SystemExit(
            "jinja2 %s is installed but the goldens are pinned to %s: pip install jinja2==%s"
            % (jinja2.__version__, JINJA2_VERSION, JINJA2_VERSION)
        )

    with open(os.path.join(FIXTURE_DIR, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        raise SystemExit("cases.json: duplicate case names")

    env = make_environment()
    models = [(DEFAULT_MODELS[0][0], args.qwen_gguf), (DEFAULT_MODELS[1][0], args.smollm2_gguf)]
    for model_name, gguf_path in models:
        template_bytes, special = load_model(gguf_path)
        out_dir = os.path.join(FIXTURE_DIR, model_name)
        os.makedirs(out_dir, exist_ok=True)
        # Remove outputs of earlier runs so renamed/removed cases leave nothing stale.
        for entry in os.listdir(out_dir):
            if entry.endswith(".txt") or entry.endswith(".error"):
                os.remove(os.path.join(out_dir, entry))
        with open(os.path.join(out_dir, "chat_template.jinja"), "wb") as f:
            f.write(template_bytes)
        with open(os.path.join(out_dir, "special_tokens.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, ensure_ascii=False, indent=2)
            f.write("\n")

        template = env.from_string(template_bytes.decode("utf-8"))
        errors = []
        for case in cases:
            messages = [clean_message(m) for m in case["messages"]]
            try:
                rendered = template.render(
                    messages=messages,
                    tools=case.get("tools"),
                    documents=None,
                    add_generation_prompt=bool(case.get("add_generation_prompt", False)),
                    **special,
                )
            except Exception as e:  # noqa: BLE001 - a template may also raise TypeError etc.; record it
                errors.append(case["name"])
                with open(os.path.join(out_dir, case["name"] + ".error"), "wb") as f:
                    f.write(("%s: %s" % (type(e).__name__, e)).encode("utf-8"))
                continue
            with open(os.path.join(out_dir, case["name"] + ".txt"), "wb") as f:
                f.write(rendered.encode("utf-8"))
        print(
            "%s: %d rendered, %d errored%s"
            % (model_name, len(cases) - len(errors), len(errors), (" (" + ", ".join(errors) + ")") if errors else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
