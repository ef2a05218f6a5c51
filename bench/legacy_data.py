"""The data path before `datasets` (commit 3f6ea11), kept only for `bench.data` to measure
beside the new one. Not used by the project.

The data pipeline: a file of rows -> validated records -> (prompt, response) text -> token ids.

    load_data(spec, tokenizer) -> TokenizedData(train, eval, data_hash, stats)

1. Read   : JSONL (an object per line, blank lines allowed), JSON (a list of objects or
            {"data": [...]}), CSV (header row; empty cells are missing) or Parquet. Every bad row
            is reported as 'FILE: line N: what' (JSONL, CSV: physical line, header = line 1) or
            'FILE: row N: what' (JSON, Parquet), or skipped and counted with `skip_invalid`.
2. Render : per format, see `qlora.formats` (templates documented there).
3. Tokenize: bos + prompt + response + eos, labels -100 on bos + prompt unless `train_on_prompt`,
            cut to `seq_len`. Examples left with nothing to learn are dropped and counted.
4. Split  : without `eval_path`, eval = the first round(eval_fraction * n) rows of a permutation
            seeded by the data hash alone, so every trial on a file sees the same split whatever
            its seed, tokenizer or pack.

Results are cached in-process (K trials of a pack tokenize once) and on disk under
$QLORA_CACHE/data/<key>.json (across processes and runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora.config import IGNORE, DataSpec, stable_hash
from qlora.formats import (
    EXTENSIONS,
    FORMATS,
    DataError,
    detect_format,
    normalize,
    read_rows,
    render,
    required_columns,
)
from qlora.packing import pack_examples
from qlora.tiny import cache_root

__all__ = [
    "DataError", "Example", "TokenizedData", "bundled_path", "read_records", "detect_format",
    "render", "tokenize_example", "prompt_ids", "load_data", "validate_data_file",
]

log = logging.getLogger(__name__)

_CACHE_VERSION = 3  # bump when tokenization or splitting changes, so stale disk caches are ignored
_MEMORY: dict[str, TokenizedData] = {}


@dataclass
class Example:
    """One tokenized example; treat as read-only (the cache shares it between trials)."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where no loss is taken (prompt, when masked)
    position_ids: list[int] | None = None  # packed rows only: restart at 0 at each example
    prompt_len: int | None = None  # tokens before the response (bos + prompt); None in packed rows


@dataclass
class TokenizedData:
    """A trial's train and eval examples, the data's identity, and what happened on the way."""

    train: list[Example]
    eval: list[Example]
    data_hash: str  # sha256 (first 16 hex) of the file bytes; see `_data_hash` with an eval file
    stats: dict = field(default_factory=dict)
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


# --------------------------------------------------------------------------------------- reading

def read_records(path: str | Path, skip_invalid: bool = False,
                 format: str = "auto") -> tuple[list[dict], str, int]:
    """Rows of a JSONL / JSON / CSV / Parquet file, validated and reduced to their format's fields;
    returns (records, detected_format, n_skipped). Raises DataError naming the file and the 1-based
    line or row of the first bad row (or skips and counts bad rows with `skip_invalid`), for an
    empty file or no rows, 'FILE: no such file', and an unsupported extension."""
    records, fmt, skipped, _ = _parse(str(path), _read_bytes(path), skip_invalid, format)
    return records, fmt, skipped


def validate_data_file(path: str, format: str = "auto", skip_invalid: bool = False) -> dict:
    """Check a data file without a tokenizer: {'rows': n, 'format': fmt, 'skipped': k}.
    Raises DataError as `read_records` does."""
    records, fmt, skipped = read_records(path, skip_invalid=skip_invalid, format=format)
    return {"rows": len(records), "format": fmt, "skipped": skipped}


def _read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if p.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {p.suffix or '(none)'!r}; "
                        f"use one of {', '.join(EXTENSIONS)}")
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if not p.is_file():
        raise DataError(f"{path}: not a file")
    return p.read_bytes()


def _parse(name: str, raw: bytes, skip_invalid: bool,
           fmt: str) -> tuple[list[dict], str, int, list[str]]:
    """(records, format, n_skipped, locations) of a file's bytes; `name` is the file's name."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{name}: format must be 'auto' or one of {list(FORMATS)}, got {fmt!r}")
    if not raw.strip():
        raise DataError(f"{name}: file is empty")
    try:
        rows = read_rows(Path(name).suffix.lower(), raw)
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    if not rows:
        raise DataError(f"{name}: no rows")

    objects = [row for _, row in rows if isinstance(row, dict)]
    if not objects and not skip_invalid:
        loc, err = rows[0]
        raise DataError(f"{name}: {loc}: {err}")
    columns = {key for row in objects for key in row}
    if fmt == "auto":
        try:
            fmt = detect_format(columns) if objects else "text"
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
    else:
        for col in required_columns(fmt):
            if objects and col not in columns:
                need = " and ".join(f"'{c}'" for c in required_columns(fmt))
                raise DataError(f"{name}: column '{col}' is missing (format {fmt} needs {need})")

    records, locations, skipped = [], [], 0
    for loc, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            record = normalize(row, fmt)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{name}: {loc}: {e}") from None
            skipped += 1
            continue
        records.append(record)
        locations.append(loc)
    if not records:
        raise DataError(f"{name}: no valid rows ({skipped} skipped)")
    return records, fmt, skipped, locations


# ------------------------------------------------------------------------------------ tokenizing

def tokenize_example(prompt: str, response: str, tokenizer, seq_len: int,
                     train_on_prompt: bool) -> tuple[Example, bool]:
    """(example, truncated): bos (if the tokenizer has one and the prompt does not already start
    with it) + prompt + response + eos (unless the response already holds eos, as chat templates
    close turns with it); labels -100 on bos + prompt unless `train_on_prompt`, else equal to the
    ids; cut to `seq_len` tokens (truncated=True when anything was cut)."""
    p_ids, r_ids = _encode(tokenizer, [prompt, response])
    return _assemble(p_ids, r_ids, tokenizer, seq_len, train_on_prompt)


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """The ids a training example of `prompt` starts with (bos where `tokenize_example` puts it,
    then the prompt): what a model trained here must be given to continue as it learned."""
    [p_ids] = _encode(tokenizer, [prompt])
    return _bos(p_ids, tokenizer) + list(p_ids)


def _bos(ids: list[int], tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids[:1] != [bos] else []


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # Special tokens written in the text (a chat template's eos) map to their ids; none are added.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _assemble(p_ids: list[int], r_ids: list[int], tokenizer, seq_len: int,
              train_on_prompt: bool) -> tuple[Example, bool]:
    eos = tokenizer.eos_token_id
    head = _bos(p_ids or r_ids, tokenizer)
    tail = [eos] if eos is not None and eos not in r_ids else []
    ids = head + list(p_ids) + list(r_ids) + tail
    n_masked = 0 if train_on_prompt else len(head) + len(p_ids)
    labels = [IGNORE] * n_masked + ids[n_masked:]
    prompt_len = min(len(head) + len(p_ids), seq_len)
    return Example(ids[:seq_len], labels[:seq_len], prompt_len=prompt_len), len(ids) > seq_len


def _has_target(ex: Example) -> bool:
    # Position 0 is never predicted (labels are shifted by one inside the model).
    return any(label != IGNORE for label in ex.labels[1:])


# --------------------------------------------------------------------------------------- loading

def load_data(spec: DataSpec, tokenizer) -> TokenizedData:
    """Read, validate, render and tokenize `spec`'s file (the bundled dataset when `spec.path` is
    None) and split it into train and eval. Without `spec.eval_path` the eval split is the first
    round(eval_fraction * n) rows (>= 1 when eval_fraction > 0, <= n - 1) of a permutation seeded
    by the data hash only; eval is then cut to `spec.max_eval_examples`. Equal inputs give equal
    data, from an in-process cache or $QLORA_CACHE/data/. Raises DataError for a bad file or an
    empty train split. With packing='pack' the train split holds rows of several examples
    (see `qlora.packing`); eval stays one example per row."""
    name = spec.path if spec.path is not None else str(bundled_path())
    raw = _read_bytes(name)
    eval_raw = _read_bytes(spec.eval_path) if spec.eval_path else None
    data_hash = _data_hash(raw, eval_raw)
    key = _cache_key(spec, tokenizer, data_hash)
    data = _MEMORY.get(key) or _load_disk(key)
    if data is None:
        data = _build(spec, tokenizer, name, raw, eval_raw, data_hash)
        _save_disk(key, data)
    _MEMORY[key] = data
    # New lists, so a caller that shuffles or trims them cannot change the cached copy.
    return TokenizedData(list(data.train), list(data.eval), data.data_hash, dict(data.stats))


def _data_hash(raw: bytes, eval_raw: bytes | None) -> str:
    """sha256 of the file; with an eval file, sha256 of the two files' digests (unambiguous)."""
    if eval_raw is None:
        return hashlib.sha256(raw).hexdigest()[:16]
    both = hashlib.sha256(raw).digest() + hashlib.sha256(eval_raw).digest()
    return hashlib.sha256(both).hexdigest()[:16]


def _eval_indices(n: int, eval_fraction: float, data_hash: str) -> list[int]:
    """Row indices of the eval split, in permutation order. Ranking rows by a hash of
    (data_hash, index) gives a permutation that no library or Python version can change."""
    if eval_fraction <= 0 or n < 2:
        return []
    k = min(max(1, round(eval_fraction * n)), n - 1)
    perm = sorted(range(n), key=lambda i: hashlib.sha256(f"{data_hash}:{i}".encode()).digest())
    return perm[:k]


def _build(spec: DataSpec, tokenizer, name: str, raw: bytes, eval_raw: bytes | None,
           data_hash: str) -> TokenizedData:
    records, fmt, skipped, locs = _parse(name, raw, spec.skip_invalid, spec.format)
    rows = list(zip(locs, records, strict=True))
    n_rows = len(rows)
    if eval_raw is None:
        eval_idx = _eval_indices(len(rows), spec.eval_fraction, data_hash)
        taken = set(eval_idx)
        train_rows = [(name, fmt, r) for i, r in enumerate(rows) if i not in taken]
        eval_rows = [(name, fmt, rows[i]) for i in eval_idx]
    else:
        e_records, e_fmt, e_skipped, e_locs = _parse(spec.eval_path, eval_raw, spec.skip_invalid,
                                                     spec.format)
        train_rows = [(name, fmt, r) for r in rows]
        eval_rows = [(spec.eval_path, e_fmt, r) for r in zip(e_locs, e_records, strict=True)]
        skipped += e_skipped
        n_rows += len(e_records)

    counts = {"n_truncated": 0, "n_dropped": 0, "n_skipped": skipped}
    train = _tokenize(train_rows, tokenizer, spec, counts)
    dropped_train = counts["n_dropped"]
    eval_ = _tokenize(eval_rows, tokenizer, spec, counts, limit=spec.max_eval_examples)
    if not train:
        raise DataError(f"{name}: no training examples left: {dropped_train} of "
                        f"{len(train_rows)} have no response token within seq_len={spec.seq_len} "
                        f"(raise train.seq_len, or shorten the prompts)")
    stats = {"n_rows": n_rows, "n_train": len(train), "n_eval": len(eval_), "format": fmt, **counts}
    if spec.packing == "pack":
        train = pack_examples(train, spec.seq_len, Example)
        stats["n_train_rows"] = len(train)
    return TokenizedData(train, eval_, data_hash, stats)


def _tokenize(rows: list[tuple[str, str, tuple[str, dict]]], tokenizer, spec: DataSpec,
              counts: dict, limit: int | None = None, chunk: int = 512) -> list[Example]:
    """Examples of (file, format, (location, record)) rows, in order, at most `limit` of them;
    updates counts' n_truncated, n_dropped and (render failures with skip_invalid) n_skipped."""
    out: list[Example] = []
    for start in range(0, len(rows), chunk):
        texts: list[str] = []
        for file, fmt, (loc, record) in rows[start:start + chunk]:
            try:
                texts.extend(render(record, fmt, tokenizer))
            except DataError as e:
                if not spec.skip_invalid:
                    raise DataError(f"{file}: {loc}: {e}") from None
                counts["n_skipped"] += 1
        ids = _encode(tokenizer, texts) if texts else []
        for p_ids, r_ids in zip(ids[0::2], ids[1::2], strict=True):
            ex, truncated = _assemble(p_ids, r_ids, tokenizer, spec.seq_len, spec.train_on_prompt)
            counts["n_truncated"] += truncated
            if not _has_target(ex):
                counts["n_dropped"] += 1
                continue
            out.append(ex)
            if limit is not None and len(out) >= limit:
                return out
    return out


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


def _cache_file(key: str) -> Path:
    return cache_root() / "data" / f"{key}.json"


def _load_disk(key: str) -> TokenizedData | None:
    path = _cache_file(key)
    try:
        blob = json.loads(path.read_text())
        return TokenizedData(
            train=[_example(row) for row in blob["train"]],
            eval=[_example(row) for row in blob["eval"]],
            data_hash=blob["data_hash"],
            stats=blob["stats"],
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # corrupt or foreign: rebuild
        log.warning("ignoring unreadable data cache %s: %s", path, e)
        return None


def _example(row: list) -> Example:
    ids, labels, positions, prompt_len = row
    return Example(list(ids), list(labels), None if positions is None else list(positions),
                   prompt_len)


def _save_disk(key: str, data: TokenizedData) -> None:
    path = _cache_file(key)
    blob = {
        "train": [[ex.input_ids, ex.labels, ex.position_ids, ex.prompt_len] for ex in data.train],
        "eval": [[ex.input_ids, ex.labels, ex.position_ids, ex.prompt_len] for ex in data.eval],
        "data_hash": data.data_hash,
        "stats": data.stats,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(blob, f, separators=(",", ":"))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a read-only cache costs speed, not correctness
        log.warning("cannot write data cache %s: %s", path, e)


def data_info(data) -> dict:
    """What a result needs to be traced to its data: the file hash and the example counts."""
    info = {"data_hash": getattr(data, "data_hash", None)}
    stats = getattr(data, "stats", {}) or {}
    for key in ("n_train", "n_eval", "n_truncated", "n_skipped", "n_dropped", "format"):
        if key in stats:
            info[key] = stats[key]
    return info
