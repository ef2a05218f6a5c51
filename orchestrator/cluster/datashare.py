"""Every dataset a sweep reads is tokenized once, by the driver, before any training; workers
open the result in place instead of tokenizing it again.

`prepare(trials, storage)` (the driver) tokenizes each distinct `DataSpec` of the trials with its
base's tokenizer (`qlora.data.load_data`: cached under $QLORA_CACHE/data/<key>/, memory-mapped),
so a bad row, a chat template that rejects one, or a `seq_len` that keeps no example is an
`error: data.path: ...` line before any run starts. With `cluster.storage` a URI (nodes that share
no disk) each tokenized folder is uploaded once to `<storage>/data/<key>/`. The `DataShare` it
returns travels with every pack: a worker opens each key from its node's cache, fetches it from
the storage when its node has none (one download per node, under a file lock), and only when
neither has it tokenizes the source itself (`train_pack` then calls `load_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import is_uri


@dataclass(frozen=True)
class DataShare:
    """The cache key of each DataSpec the driver tokenized, and where nodes fetch them from."""

    keys: dict = field(default_factory=dict)  # DataSpec -> cache key
    storage: str | None = None  # a URI with data/<key>/ folders, or None
    # DataSpec -> qlora.memory.RowTokens: its longest training row, for the memory estimate
    rows: dict = field(default_factory=dict)

    def open(self) -> dict:
        """{DataSpec: TokenizedData} of the keys this node has or can fetch (worker side)."""
        from orchestrator.cluster.storage import fetch_data
        from qlora.data import cache_dir, open_key

        out = {}
        for spec, key in self.keys.items():
            data = open_key(key)
            if data is None and self.storage is not None and fetch_data(self.storage, key,
                                                                         cache_dir(key)):
                data = open_key(key)
            if data is not None:
                out[spec] = data
        return out


def check_targets(trials: list) -> None:
    """Every trial's `lora.target_modules` selects a linear of its model (the model's skeleton
    built on the meta device, once per model and setting): an `error:` before any run, not a
    failed pack."""
    from qlora.base import target_error

    seen = set()
    for trial in trials:
        what = (trial.base.name_or_path, trial.base.revision, trial.spec.target_modules)
        if trial.spec.target_modules == "all-linear" or what in seen:  # (every model has one)
            continue
        seen.add(what)
        if why := target_error(trial.base, trial.spec.target_modules):
            raise ConfigError("lora.target_modules", why)


def prepare(trials: list, storage: str | None = None) -> DataShare:
    """Tokenize the data of `trials` (Trial: .base, .spec.data) once each; upload it to
    `storage` when that is a URI. Raises ConfigError naming `data.path` (or `data.eval_path`,
    `train.seq_len`) for data that cannot be read or keeps no training example."""
    from qlora.base import load_tokenizer
    from qlora.data import DataError, cache_dir, load_data
    from qlora.memory import rows_of

    tokenizers: dict = {}
    keys: dict = {}
    rows: dict = {}
    for trial in trials:
        spec = trial.spec.data
        if spec in keys:
            continue
        name = trial.base.name_or_path
        if name not in tokenizers:
            tokenizers[name] = load_tokenizer(trial.base)
        try:
            data = load_data(spec, tokenizers[name])
            keys[spec] = data.key
            if (row := rows_of(data)) is not None:
                rows[spec] = row
        except DataError as e:
            text = str(e)
            key = "data.eval_path" if spec.eval_path and text.startswith(f"{spec.eval_path}:") \
                else "train.seq_len" if "no training examples left" in text else "data.path"
            raise ConfigError(key, text) from None
    uri = storage if storage is not None and is_uri(storage) else None
    if uri is not None:
        from orchestrator.cluster.storage import put_data

        for key in sorted(set(keys.values())):
            put_data(cache_dir(key), uri)
    return DataShare(keys, uri, rows)
