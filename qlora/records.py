"""Rows of a source validated into records: the format from the columns, every bad row named by
its file and line (or row), or skipped and counted with `skip_invalid`; in bounded memory.

`validate_data_file` checks a source without a tokenizer (the preflight); `write_records` writes
the valid records to an Arrow file, one string column per field of the format, for
`qlora.tokens` to tokenize.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cachedir import new_folder
from .config import DataSpec, stable_hash
from .formats import FORMATS, DataError, detect_format, normalize, required_columns
from .sources import Source, content_hash, masked, resolve, rows
from .tiny import cache_root

__all__ = ["read_records", "validate_data_file", "records", "scan", "write_records", "named",
           "FIELDS"]

_BATCH = 10_000  # records per Arrow record batch
_VERSION = 1  # bump when validation or the records' layout changes


def named(ref: str, call):
    """call(), its DataError prefixed with the source's name (a URI's credentials masked) unless
    the message already starts with it."""
    shown = masked(ref)
    try:
        return call()
    except DataError as e:
        text = str(e)
        ok = text.startswith((f"{ref}:", f"{shown}:")) and (shown == ref or not
                                                              text.startswith(f"{ref}:"))
        raise DataError(text if ok else f"{shown}: {text}") from None



def read_records(path: str | Path, skip_invalid: bool = False,
                 format: str = "auto") -> tuple[list[dict], str, int]:
    """Rows of a data source, validated and reduced to their format's fields, as a list (small
    data and tests; training reads the Arrow records instead); returns (records,
    detected_format, n_skipped). Raises DataError as `validate_data_file` does."""
    src = named(str(path), lambda: resolve(str(path)))
    fmt = scan(src, format, skip_invalid)["format"]
    records, skipped = [], 0
    for _, record in _records(src, fmt, skip_invalid):
        if record is None:
            skipped += 1
        else:
            records.append(record)
    if not records:
        raise DataError(f"{src.ref}: no valid rows ({skipped} skipped)")
    return records, fmt, skipped


def validate_data_file(path: str, format: str = "auto", skip_invalid: bool = False,
                       spec: DataSpec | None = None) -> dict:
    """Check a data source without a tokenizer, streaming it in bounded memory:
    {'rows': n, 'format': fmt, 'skipped': k}. Raises DataError naming the file and the 1-based
    line or row of the first bad row (unless `skip_invalid`), for an empty file or no rows,
    'FILE: no such file', an unsupported extension, and a dataset that cannot be loaded."""
    spec = spec or DataSpec()
    src = named(path, lambda: resolve(path, spec.name, spec.split, spec.revision))
    return records(src, format, skip_invalid)[1]


def records(src: Source, format: str, skip_invalid: bool):
    """(the Arrow file, info) of the source's valid records, written once per content, format
    and `skip_invalid` to $QLORA_CACHE/data/records/<key>/ (records.arrow and meta.json, written
    last): the preflight's check writes them, and every tokenization (any tokenizer, any
    seq_len) reads them instead of the source. info: {'rows', 'format', 'skipped'}."""
    from filelock import FileLock

    key = stable_hash([_VERSION, named(src.ref, lambda: content_hash(src)), format,
                       skip_invalid, src.loc_kind], 20)
    folder = cache_root() / "data" / "records" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        try:
            info = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            fmt = scan(src, format, skip_invalid)["format"]
            with new_folder(folder) as tmp:
                n, skipped = write_records(src, fmt, skip_invalid, tmp / "records.arrow")
                info = {"rows": n, "format": fmt, "skipped": skipped}
                (tmp / "meta.json").write_text(json.dumps(info))
    return folder / "records.arrow", info


def scan(src: Source, fmt: str, skip_invalid: bool) -> dict:
    """The format of a source (detected from the union of its rows' columns when 'auto'), after
    the file-level checks; one pass over the rows that keeps only their column names."""
    name = src.ref
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{name}: format must be 'auto' or one of {list(FORMATS)}, got {fmt!r}")
    columns: set[str] = set()
    first_error, n_rows, n_objects = None, 0, 0
    for loc, row in _Iter(src):
        n_rows += 1
        if isinstance(row, dict):
            n_objects += 1
            columns.update(row)
        elif first_error is None:
            first_error = (loc, row)
    if not n_rows:
        raise DataError(f"{name}: no rows")
    if not n_objects and not skip_invalid:
        loc, err = first_error
        raise DataError(f"{name}: {loc}: {err}")
    if fmt == "auto":
        try:
            fmt = detect_format(columns) if n_objects else "text"
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
    else:
        for col in required_columns(fmt):
            if n_objects and col not in columns:
                need = " and ".join(f"'{c}'" for c in required_columns(fmt))
                raise DataError(f"{name}: column '{col}' is missing (format {fmt} needs {need})")
    return {"format": fmt, "rows": n_rows}


class _Iter:
    """Iterates a source's rows, prefixing the file-level errors raised on the way with its name."""

    def __init__(self, src: Source) -> None:
        self.src = src

    def __iter__(self):
        it = rows(self.src)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except DataError as e:
                raise DataError(f"{self.src.ref}: {e}") from None
            yield item


def _records(src: Source, fmt: str, skip_invalid: bool):
    """(location, record) per row of the source in order, record None for a skipped bad row.
    Raises DataError 'FILE: loc: what' for a bad row unless `skip_invalid`."""
    for loc, row in _Iter(src):
        try:
            if isinstance(row, DataError):
                raise row
            record = normalize(row, fmt)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{src.ref}: {loc}: {e}") from None
            yield loc, None
            continue
        yield loc, record


FIELDS = {"alpaca": ("instruction", "input", "output"), "prompt_completion": ("prompt", "completion"),
           "text": ("text",), "chat": ("messages",)}


def write_records(src: Source, fmt: str, skip_invalid: bool, path: Path) -> int:
    """The source's valid records as an Arrow file (one string column per field, a chat's
    messages as JSON text, and `loc`: the row's line or row number); returns (rows written,
    rows skipped). Raises DataError as `validate_data_file` does."""
    import pyarrow as pa

    names = FIELDS[fmt]
    schema = pa.schema([(f, pa.string()) for f in names] + [("loc", pa.int64())])
    cols: dict[str, list] = {f: [] for f in (*names, "loc")}
    skipped = n = 0

    def flush(writer) -> None:
        writer.write_batch(pa.record_batch([pa.array(cols[f], type=schema.field(f).type)
                                            for f in schema.names], schema=schema))
        for values in cols.values():
            values.clear()

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for loc, record in _records(src, fmt, skip_invalid):
            if record is None:
                skipped += 1
                continue
            n += 1
            for f in names:
                value = record[f]
                cols[f].append(json.dumps(value) if f == "messages" else value)
            cols["loc"].append(int(loc.split()[-1]))
            if len(cols["loc"]) >= _BATCH:
                flush(writer)
        if cols["loc"] or not n:
            flush(writer)
    if not n:
        raise DataError(f"{src.ref}: no valid rows ({skipped} skipped)")
    return n, skipped


