"""The data pipeline: a source of rows -> validated records -> (prompt, response) text -> token ids,
held in memory-mapped Arrow files that every trial and worker process on a machine shares.

    load_data(spec, tokenizer) -> TokenizedData(train, eval, data_hash, stats)

1. Read    : a file (JSONL, JSON, CSV, Parquet; local or an fsspec URI), a saved dataset folder, or
             a dataset repository / hub id (see `qlora.sources`), streamed row by row. Every bad
             row is reported as 'FILE: line N: what' (JSONL, CSV: physical line, header = line 1)
             or 'FILE: row N: what' (JSON, Parquet, datasets), or skipped and counted with
             `skip_invalid`. Valid rows, reduced to their format's fields, are written to an Arrow
             file (`records`), keyed by the content hash: a second tokenizer or seq_len reads no
             source again.
2. Render  : per format, see `qlora.formats` (templates documented there).
3. Tokenize: `Dataset.map(batched=True, num_proc=...)` over the records: bos + prompt + response +
             eos, labels -100 on bos + prompt unless `train_on_prompt`, cut to `seq_len`. Examples
             left with nothing to learn are dropped and counted.
4. Split   : without `eval_path`, eval = the first round(eval_fraction * n) rows of a permutation
             seeded by the data hash alone, so every trial on a source sees the same split whatever
             its seed, tokenizer or pack.

Everything lands under $QLORA_CACHE/data/<key>/ (key: a fingerprint of the data's content, the
tokenizer, its chat template and the data settings): `tokens*.arrow` (ids, masked prefix length),
`train.npy` / `eval.npy` (row numbers), `meta.json` (stats; written last, so a folder without it is
unfinished). `train` and `eval` are sequences over those files, read in place: a worker's memory
does not grow with the dataset, and the K trials of a pack and every process on a machine share
one copy through the page cache. The first process to need a key builds it under a file lock; the
others wait and read it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cachedir import new_folder
from .config import DataSpec, stable_hash
from .formats import DataError, detect_format, render
from .packing import pack_bins
from .records import named, read_records, validate_data_file
from .records import records as read_source
from .sources import Source, content_hash, resolve
from .tiny import cache_root
from .tokens import (
    Example,
    Examples,
    Tokens,
    flags,
    lengths,
    prompt_ids,
    tokenize_all,
    tokenize_example,
)

__all__ = [
    "DataError", "Example", "Examples", "TokenizedData", "bundled_path", "read_records",
    "detect_format", "render", "tokenize_example", "prompt_ids", "load_data",
    "validate_data_file", "source_of", "cache_dir", "open_key",
]

log = logging.getLogger(__name__)

_CACHE_VERSION = 4  # bump when tokenization or splitting changes, so stale disk caches are ignored
_MEMORY: dict[str, TokenizedData] = {}


@dataclass
class TokenizedData:
    """A trial's train and eval examples, the data's identity, and what happened on the way."""

    train: Sequence[Example]
    eval: Sequence[Example]
    data_hash: str  # sha256 (first 16 hex) of the content; see `qlora.sources.content_hash`
    stats: dict = field(default_factory=dict)
    key: str = ""  # the cache key: $QLORA_CACHE/data/<key>/ holds the tokenized files
    # a mixture's sources, in order: (label, share, n_train, n_eval); see qlora.mixture
    parts: tuple = ()
    # stats: n_rows (valid rows read), n_train, n_eval, n_skipped (invalid rows), n_truncated,
    # n_dropped (examples with nothing to learn after masking and truncation), format


def bundled_path() -> Path:
    """The bundled dataset: `qlora/bundled/train.jsonl` in an installed wheel, else
    `<repo>/data/bundled/train.jsonl` in a checkout. Raises DataError when neither exists."""
    here = Path(__file__).resolve().parent
    candidates = (here / "bundled" / "train.jsonl",
                  here.parent / "data" / "bundled" / "train.jsonl")
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{candidates[1]}: no such file (the bundled dataset; run "
                    "python data/generate_bundled.py)")


def source_of(spec: DataSpec, path: str | None = None) -> Source:
    """The source of `spec.path` (or of `path`, e.g. an eval file); the bundled file for None."""
    path = spec.path if path is None else path
    if path is None:
        return resolve(str(bundled_path()))
    return named(path, lambda: resolve(path, spec.name, spec.split, spec.revision))


# --------------------------------------------------------------------------------------- loading

def load_data(spec: DataSpec, tokenizer) -> TokenizedData:
    """Read, validate, render and tokenize `spec`'s source (the bundled dataset when `spec.path`
    is None) and split it into train and eval. Without `spec.eval_path` the eval split is the
    first round(eval_fraction * n) rows (>= 1 when eval_fraction > 0, <= n - 1) of a permutation
    seeded by the data hash only; eval is then cut to `spec.max_eval_examples`. Equal inputs give
    equal data, from an in-process cache or $QLORA_CACHE/data/. Raises DataError for a bad source
    or an empty train split. With packing='pack' the train split holds rows of several examples
    (see `qlora.packing`); eval stays one example per row."""
    if spec.mix:
        from .mixture import mixture, parts_of

        return mixture(spec, [load_data(part, tokenizer) for _, part in parts_of(spec)])
    src = source_of(spec)
    esrc = source_of(spec, spec.eval_path) if spec.eval_path else None
    data_hash = _data_hash(src, esrc)
    key = _cache_key(spec, tokenizer, data_hash)
    data = _MEMORY.get(key)
    if data is None:
        folder = cache_dir(key)
        data = _open(folder)
        if data is None:
            from filelock import FileLock

            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder) + ".lock"):  # one process builds, the others then read
                data = _open(folder)
                if data is None:
                    _build(spec, tokenizer, src, esrc, data_hash, folder)
                    data = _open(folder)
        _MEMORY[key] = data
    return TokenizedData(data.train, data.eval, data.data_hash, dict(data.stats), key)


def open_key(key: str) -> TokenizedData | None:
    """The tokenized data of cache key `key` if this machine has it (a driver prepared it, or
    it was fetched from `cluster.storage`); None otherwise."""
    data = _MEMORY.get(key) or _open(cache_dir(key))
    if data is None:
        return None
    _MEMORY[key] = data
    return TokenizedData(data.train, data.eval, data.data_hash, dict(data.stats), key)


def cache_dir(key: str) -> Path:
    """Where the tokenized data of cache key `key` lives."""
    return cache_root() / "data" / key


def _data_hash(src: Source, esrc: Source | None) -> str:
    """The content hash of the source; with an eval source, a hash of both (unambiguous)."""
    digest = named(src.ref, lambda: content_hash(src))
    if esrc is None:
        return digest
    other = named(esrc.ref, lambda: content_hash(esrc))
    return hashlib.sha256(f"{digest}:{other}".encode()).hexdigest()[:16]


def _eval_indices(n: int, eval_fraction: float, data_hash: str) -> list[int]:
    """Row indices of the eval split, in permutation order. Ranking rows by a hash of
    (data_hash, index) gives a permutation that no library or Python version can change; only
    the k smallest are kept (memory bounded by the split, not the data)."""
    if eval_fraction <= 0 or n < 2:
        return []
    k = min(max(1, round(eval_fraction * n)), n - 1)
    return heapq.nsmallest(
        k, range(n), key=lambda i: hashlib.sha256(f"{data_hash}:{i}".encode()).digest())


def _build(spec: DataSpec, tokenizer, src: Source, esrc: Source | None, data_hash: str,
           folder: Path) -> None:
    """Tokenize into a new folder beside `folder`, then move it into place."""
    with new_folder(folder) as tmp:
        meta = _build_into(spec, tokenizer, src, esrc, data_hash, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta))


def _build_into(spec: DataSpec, tokenizer, src: Source, esrc: Source | None, data_hash: str,
                tmp: Path) -> dict:
    import datasets

    path, info = named(src.ref, lambda: read_source(src, spec.format, spec.skip_invalid))
    records = datasets.Dataset.from_file(str(path))
    fmt, skipped = info["format"], info["skipped"]
    tokens = tokenize_all(records, fmt, tokenizer, spec, tmp / "tokens.arrow")
    n = len(tokens)
    cols = flags(tokens)
    n_rows = n
    if esrc is None:
        eval_order = np.asarray(_eval_indices(n, spec.eval_fraction, data_hash), dtype=np.int64)
        in_train = np.ones(n, dtype=bool)
        in_train[eval_order] = False
        e_cols, e_ref, e_files = cols, src, None
    else:
        e_path, e_info = read_source(esrc, spec.format, spec.skip_invalid)
        e_records = datasets.Dataset.from_file(str(e_path))
        e_fmt, e_skipped = e_info["format"], e_info["skipped"]
        e_tokens = tokenize_all(e_records, e_fmt, tokenizer, spec, tmp / "eval_tokens.arrow")
        e_cols, e_ref = flags(e_tokens), esrc
        e_files = [Path(f["filename"]).name for f in e_tokens.cache_files]
        eval_order = np.arange(len(e_tokens), dtype=np.int64)
        in_train = np.ones(n, dtype=bool)
        skipped += e_skipped
        n_rows += len(e_tokens)

    counts = {"n_truncated": 0, "n_dropped": 0, "n_skipped": skipped}
    errors = cols["error"] & in_train
    if errors.any():
        i = int(np.flatnonzero(errors)[0])
        if not spec.skip_invalid:
            raise DataError(f"{src.ref}: {src.loc_kind} {cols['loc'][i]}: "
                            f"{tokens[i]['error']}")
        counts["n_skipped"] += int(errors.sum())
    done = in_train & ~cols["error"]
    counts["n_truncated"] += int((cols["truncated"] & done).sum())
    dropped_train = int((~cols["keep"] & done).sum())
    counts["n_dropped"] += dropped_train
    train_idx = np.flatnonzero(cols["keep"] & done).astype(np.int64)

    eval_idx: list[int] = []
    limit = spec.max_eval_examples
    e_set = tokens if esrc is None else e_tokens
    for i in eval_order.tolist():
        if limit is not None and len(eval_idx) >= limit:
            break
        if e_cols["error"][i]:
            if not spec.skip_invalid:
                raise DataError(f"{e_ref.ref}: {e_ref.loc_kind} {e_cols['loc'][i]}: "
                                f"{e_set[i]['error']}")
            counts["n_skipped"] += 1
            continue
        counts["n_truncated"] += int(e_cols["truncated"][i])
        if not e_cols["keep"][i]:
            counts["n_dropped"] += 1
            continue
        eval_idx.append(i)
    if not len(train_idx):
        raise DataError(f"{src.ref}: no training examples left: {dropped_train} of "
                        f"{int(in_train.sum())} have no response token within "
                        f"seq_len={spec.seq_len} (raise train.seq_len, or shorten the prompts)")
    stats = {"n_rows": n_rows, "n_train": len(train_idx), "n_eval": len(eval_idx), "format": fmt,
             **counts}
    np.save(tmp / "train.npy", train_idx)
    np.save(tmp / "eval.npy", np.asarray(eval_idx, dtype=np.int64))
    if spec.packing == "pack":
        bins = pack_bins(lengths(tokens)[train_idx], spec.seq_len)
        members = [train_idx[m] for m in bins]
        np.save(tmp / "pack_members.npy", np.concatenate(members).astype(np.int64))
        np.save(tmp / "pack_offsets.npy",
                np.concatenate([[0], np.cumsum([len(m) for m in members])]).astype(np.int64))
        stats["n_train_rows"] = len(bins)
    files = [Path(f["filename"]).name for f in tokens.cache_files]
    del tokens, records
    return {"files": files, "eval_files": e_files, "data_hash": data_hash, "stats": stats,
            "version": _CACHE_VERSION}


def _open(folder: Path) -> TokenizedData | None:
    """The tokenized data of a finished cache folder; None when there is none (or it is
    unreadable, or foreign: then it is rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != _CACHE_VERSION:
            return None
        tokens = Tokens([folder / f for f in meta["files"]])
        e_tokens = tokens if meta["eval_files"] is None else \
            Tokens([folder / f for f in meta["eval_files"]])
        packs = None
        if (folder / "pack_members.npy").exists():
            packs = (np.load(folder / "pack_members.npy", mmap_mode="r"),
                     np.load(folder / "pack_offsets.npy", mmap_mode="r"))
        train = Examples(tokens, np.load(folder / "train.npy", mmap_mode="r"), packs)
        eval_ = Examples(e_tokens, np.load(folder / "eval.npy", mmap_mode="r"))
        return TokenizedData(train, eval_, meta["data_hash"], meta["stats"], folder.name)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # corrupt or foreign: rebuild
        log.warning("ignoring unreadable data cache %s: %s", folder, e)
        return None


# ----------------------------------------------------------------------------------------- cache

def _cache_key(spec: DataSpec, tokenizer, data_hash: str) -> str:
    import transformers

    return stable_hash({
        "v": _CACHE_VERSION,
        "transformers": transformers.__version__,
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                      tokenizer.bos_token_id, tokenizer.eos_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "data": data_hash,
        "spec": asdict(spec),
    }, 16)


def data_info(data) -> dict:
    """What a result needs to be traced to its data: the file hash and the example counts."""
    info = {"data_hash": getattr(data, "data_hash", None)}
    stats = getattr(data, "stats", {}) or {}
    for key in ("n_train", "n_eval", "n_truncated", "n_skipped", "n_dropped", "format"):
        if key in stats:
            info[key] = stats[key]
    for label, source in stats.get("sources", {}).items():  # a mixture's sources
        info[f"share_{label}"] = source["share"]
        info[f"n_train_{label}"] = source["n_train"]
        info[f"data_hash_{label}"] = source["data_hash"]
    return info

