"""Where a dataset's rows come from, read in bounded memory, and what identifies its content.

`data.path` names one of:

- a local file, `.jsonl` / `.json` / `.csv` / `.parquet` (read by `qlora.formats`, a line or a
  batch at a time);
- a file behind an fsspec URI, `s3://bucket/train.jsonl`, `gs://...` (same readers; endpoint and
  credentials from the environment, as for `cluster.storage`: never in the URI);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`load_from_disk`);
- a dataset repository: a local folder of data files (and a README card), or a hub id such as
  `tatsu-lab/alpaca`, loaded by `datasets.load_dataset(path, name, split=..., revision=...)`
  from its cache, or from the hub unless `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` is set.

`rows(source)` yields (location, row) pairs: 'line N' / 'row N' of a file, 'row N' of a dataset.
`content_hash(source)` identifies the content: the sha256 of a file's bytes (memoized per path,
size and modification time, so an unchanged file is not read again), the fingerprint `datasets`
gives a loaded dataset (for a hub id: its revision's files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .formats import EXTENSIONS, DataError

__all__ = ["Source", "resolve", "rows", "content_hash", "check_uri", "masked", "dataset"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One dataset: `kind` is file | uri | saved | repo | hub; `ref` is what the user wrote (errors
    name it), `where` the resolved local path or URI."""

    kind: str
    ref: str
    where: str
    name: str | None = None  # a dataset's configuration (load_dataset's `name`)
    split: str = "train"
    revision: str | None = None

    @property
    def loc_kind(self) -> str:
        return "line" if self.kind in ("file", "uri") and self.suffix in (".jsonl", ".csv") \
            else "row"

    @property
    def suffix(self) -> str:
        return Path(self.where.split("?", 1)[0]).suffix.lower()


def is_uri(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def masked(path: str) -> str:
    """`path` as it may be shown: a URI's user and password replaced by ***."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", path)


def check_uri(uri: str) -> None:
    """A URI names a place, never a credential: 'scheme://user:secret@...' is refused (the
    secret would reach logs and runs); credentials come from the environment."""
    if masked(uri) != uri:
        raise DataError(f"{masked(uri)}: credentials in a URI are refused; give them in the "
                        "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")


def resolve(path: str, name: str | None = None, split: str = "train",
            revision: str | None = None) -> Source:
    """The source `path` names (see the module doc). Raises DataError for an unsupported file
    type, a missing file, or a name that is neither a file, a folder nor a hub id."""
    if is_uri(path):
        check_uri(path)
        src = Source("uri", path, path, name, split, revision)
        if src.suffix not in EXTENSIONS:
            raise DataError(f"{path}: unsupported file type {src.suffix or '(none)'!r}; "
                            f"use one of {', '.join(EXTENSIONS)}")
        return src
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        saved = (local / "state.json").is_file() or (local / "dataset_dict.json").is_file()
        return Source("saved" if saved else "repo", path, str(local), name, split, revision)
    suffix = local.suffix.lower()
    if local.exists() and not local.is_file():
        raise DataError(f"{path}: not a file")
    if suffix in EXTENSIONS or local.exists():
        if suffix not in EXTENSIONS:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                            f"use one of {', '.join(EXTENSIONS)}")
        if not local.exists():
            raise DataError(f"{path}: no such file")
        return Source("file", path, str(local), name, split, revision)
    if _HUB_ID.match(path) and "/" in path and not path.startswith((".", "~")):
        return Source("hub", path, path, name, split, revision)
    if suffix:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of "
                        f"{', '.join(EXTENSIONS)}, a saved dataset folder or a hub id "
                        "(owner/name)")
    raise DataError(f"{path}: no such file, folder or hub dataset (a hub id is owner/name)")


# ---------------------------------------------------------------------------------------- rows

def rows(src: Source) -> Iterator[tuple[str, dict | DataError]]:
    """(location, row) pairs of the source, in order, in bounded memory."""
    from .formats import iter_rows

    if src.kind in ("file", "uri"):
        with _open(src) as f:
            if _blank(f):
                raise DataError("file is empty")
            f.seek(0)
            yield from iter_rows(src.suffix, f)
        return
    ds = dataset(src)
    n = 0
    for batch in ds.iter(batch_size=1000):
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols), strict=True):
            n += 1
            yield f"row {n}", dict(zip(cols, values, strict=True))


def _blank(f) -> bool:
    while chunk := f.read(_CHUNK):
        if chunk.strip():
            return False
    return True


def _open(src: Source):
    if src.kind == "file":
        return open(src.where, "rb")
    try:
        fs, path = _fs(src)
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise DataError("no such file") from None
    except ImportError as e:
        raise DataError(f"no filesystem for this URI ({e})") from None
    except Exception as e:  # noqa: BLE001 - a store that cannot be reached: its own words
        raise DataError(f"cannot be read ({_why(e)})") from None


def _fs(src: Source):
    """(filesystem, path) of a URI, a fresh client: fsspec's cached one would keep the endpoint
    and credentials the environment had when it was made."""
    from fsspec.core import url_to_fs

    return url_to_fs(src.where, skip_instance_cache=True)


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def dataset(src: Source):
    """The `datasets.Dataset` a saved folder, repository folder or hub id holds (split
    `src.split`). Raises DataError for a missing split, or a hub id not in the cache that the hub
    cannot give (offline, unreachable, unknown)."""
    import datasets

    try:
        if src.kind == "saved":
            ds = datasets.load_from_disk(src.where)
        else:
            ds = datasets.load_dataset(src.where, src.name, split=src.split,
                                       revision=src.revision)
    except DataError:
        raise
    except (ValueError, KeyError) as e:
        raise DataError(_why(e)) from None
    except Exception as e:  # noqa: BLE001 - the hub's errors come in many classes
        offline = datasets.config.HF_HUB_OFFLINE
        where = ("not in the local datasets cache (HF_HUB_OFFLINE is set)" if offline else
                 "not in the local datasets cache, and the hub did not give it")
        raise DataError(f"{where} ({type(e).__name__}: {_why(e)}); check the id, or download it "
                        "where the hub is reachable") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(f"no split {src.split!r}; data.split is one of {sorted(ds)}")
        ds = ds[src.split]
    return ds


# ----------------------------------------------------------------------------------- identity

def content_hash(src: Source) -> str:
    """sha256 (first 16 hex) of what the source holds; see the module doc."""
    if src.kind == "file":
        st = os.stat(src.where)
        stamp = {"path": os.path.realpath(src.where), "size": st.st_size,
                 "mtime": st.st_mtime_ns}
        return memo_sha256(stamp, lambda: _hash_stream(open(src.where, "rb")))
    if src.kind == "uri":
        info = _uri_info(src)
        return memo_sha256(info, lambda: _hash_stream(_open(src)))
    ds = dataset(src)
    return hashlib.sha256(f"{src.kind}:{ds._fingerprint}".encode()).hexdigest()[:16]


def _uri_info(src: Source) -> dict:
    try:
        fs, path = _fs(src)
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError("no such file") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot be read ({_why(e)})") from None
    if info.get("type") == "directory":
        raise DataError("not a file")
    keep = ("size", "ETag", "etag", "LastModified", "mtime", "md5Hash", "generation")
    return {"uri": src.where, **{k: str(info[k]) for k in keep if k in info}}


def _hash_stream(f) -> str:
    h = hashlib.sha256()
    with f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:16]


def memo_sha256(stamp: dict, compute) -> str:
    """`compute()` (a sha256 hex digest), kept under $QLORA_CACHE by `stamp` (a path with its
    sizes and times): a big file or folder is read once until it changes."""
    from .config import stable_hash
    from .tiny import cache_root

    path = cache_root() / "data" / "hashes" / f"{stable_hash(stamp, 24)}.json"
    try:
        return json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sha256": digest, **stamp}))
        os.replace(tmp, path)
    except OSError:
        pass
    return digest
