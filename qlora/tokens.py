"""Tokenizing records into Arrow files with `Dataset.map`, and reading them back in place.

An example is bos + prompt + response + eos, labels -100 on bos + prompt unless
`train_on_prompt`, cut to `seq_len`; examples left with nothing to learn are kept in the file with
`keep` false and counted by the caller. A row is stored as its ids and the length of its masked
prefix (labels are the ids after it), so a file holds one int32 per token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IGNORE, DataSpec
from .formats import DataError, render
from .records import FIELDS

__all__ = ["Example", "Examples", "Tokens", "tokenize_example", "prompt_ids", "tokenize_all",
           "flags", "lengths"]

_PROGRESS_FROM = 50_000  # rows from which tokenizing shows a progress bar


@dataclass
class Example:
    """One tokenized example; treat as read-only (the cache shares it between trials)."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where no loss is taken (prompt, when masked)
    position_ids: list[int] | None = None  # packed rows only: restart at 0 at each example
    prompt_len: int | None = None  # tokens before the response (bos + prompt); None in packed rows




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
    ids, n_masked, prompt_len, truncated = _assemble_ids(p_ids, r_ids, tokenizer, seq_len,
                                                         train_on_prompt)
    return Example(ids, [IGNORE] * n_masked + ids[n_masked:], prompt_len=prompt_len), truncated


def _assemble_ids(p_ids: list[int], r_ids: list[int], tokenizer, seq_len: int,
                  train_on_prompt: bool) -> tuple[list[int], int, int, bool]:
    """(ids cut to seq_len, how many leading labels are masked, prompt length, truncated)."""
    eos = tokenizer.eos_token_id
    head = _bos(p_ids or r_ids, tokenizer)
    tail = [eos] if eos is not None and eos not in r_ids else []
    ids = head + list(p_ids) + list(r_ids) + tail
    n_masked = 0 if train_on_prompt else len(head) + len(p_ids)
    prompt_len = min(len(head) + len(p_ids), seq_len)
    return ids[:seq_len], min(n_masked, seq_len), prompt_len, len(ids) > seq_len


def _workers(n: int) -> int:
    """Processes to tokenize `n` rows with: one per 20,000 rows, at most the machine's cores
    (QLORA_DATA_PROCS overrides)."""
    env = os.environ.get("QLORA_DATA_PROCS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, n // 20_000))


def tokenize_all(records, fmt: str, tokenizer, spec: DataSpec, path: Path):
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "n_masked": datasets.Value("int32"), "prompt_len": datasets.Value("int32"),
        "truncated": datasets.Value("bool"), "keep": datasets.Value("bool"),
        "error": datasets.Value("string"), "loc": datasets.Value("int64"),
    })
    quiet = len(records) < _PROGRESS_FROM and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        nproc = _workers(len(records))
        return records.map(
            _tokenize_batch, batched=True, batch_size=512, num_proc=nproc if nproc > 1 else None,
            fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "seq_len": spec.seq_len,
                       "train_on_prompt": spec.train_on_prompt},
            remove_columns=records.column_names, features=features,
            cache_file_name=str(path), new_fingerprint=path.stem + os.urandom(4).hex(),
            desc=f"tokenizing {len(records):,} rows")
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _tokenize_batch(batch: dict, tokenizer, fmt: str, seq_len: int,
                    train_on_prompt: bool) -> dict:
    locs = batch["loc"]
    texts: list[str] = []
    errors: list[str | None] = []
    for i in range(len(locs)):
        record = {f: batch[f][i] for f in FIELDS[fmt]}
        if fmt == "chat":
            record["messages"] = json.loads(record["messages"])
        try:
            texts.extend(render(record, fmt, tokenizer))
            errors.append(None)
        except DataError as e:
            errors.append(str(e))
    ids = iter(_encode(tokenizer, texts) if texts else [])
    out: dict[str, list] = {k: [] for k in ("input_ids", "n_masked", "prompt_len", "truncated",
                                            "keep")}
    for error in errors:
        if error is not None:
            row = ([], 0, 0, False, False)
        else:
            ids_, n_masked, prompt_len, truncated = _assemble_ids(
                next(ids), next(ids), tokenizer, seq_len, train_on_prompt)
            row = (ids_, n_masked, prompt_len, truncated, len(ids_) > max(1, n_masked))
        for k, v in zip(out, row, strict=True):
            out[k].append(v)
    return {**out, "error": errors, "loc": locs}


def flags(tokens) -> dict:
    table = tokens.data.table
    return {
        "keep": table.column("keep").to_numpy(),
        "truncated": table.column("truncated").to_numpy(),
        "error": table.column("error").is_valid().to_numpy(),
        "loc": table.column("loc").to_numpy(),
    }


def lengths(tokens) -> np.ndarray:
    return np.concatenate([np.diff(c.offsets.to_numpy())
                           for c in tokens.data.table.column("input_ids").chunks])


# ------------------------------------------------------------------------------------ reading back

class Tokens:
    """Tokenized rows of Arrow files, read in place: each column chunk is a numpy view of the
    memory-mapped file, and an Example is built only when asked for."""

    def __init__(self, files: list[Path]) -> None:
        import pyarrow as pa

        # The Arrow files `Dataset.map` wrote, mapped as `datasets` maps them (an IPC stream over
        # a memory map: zero-copy), without importing `datasets` in every worker.
        self._keep = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
        self.chunks, starts = [], [0]
        for table in self._keep:
            ids, masked, prompt = (table.column(c) for c in ("input_ids", "n_masked",
                                                             "prompt_len"))
            for i, chunk in enumerate(ids.chunks):
                self.chunks.append((chunk.values.to_numpy(), chunk.offsets.to_numpy(),
                                    masked.chunk(i).to_numpy(), prompt.chunk(i).to_numpy()))
                starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts, dtype=np.int64)

    def extents(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's token count and how many of its labels are kept (not masked)."""
        lens = np.concatenate([np.diff(offsets) for _, offsets, _, _ in self.chunks])
        masked = np.concatenate([m for _, _, m, _ in self.chunks])
        return lens, lens - np.minimum(masked, lens)

    def example(self, j: int) -> Example:
        c = int(np.searchsorted(self.starts, j, side="right")) - 1
        values, offsets, masked, prompt = self.chunks[c]
        k = j - int(self.starts[c])
        ids = values[offsets[k]:offsets[k + 1]].tolist()
        n = int(masked[k])
        return Example(ids, [IGNORE] * n + ids[n:], prompt_len=int(prompt[k]))


class ReadOnly(Sequence):
    """A sequence built item by item (`_item(i)`, 0 <= i < len): slices give lists, negative
    indices count from the end, and it equals any sequence of equal items."""

    def _item(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(i)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None


class Examples(ReadOnly):
    """A read-only sequence of Examples over tokenized Arrow rows (`rows`: their row numbers, in
    order); with `packs` (members, offsets), item i is the packed row of members
    [offsets[i], offsets[i + 1]) (see `qlora.packing`)."""

    def __init__(self, tokens: Tokens, rows: np.ndarray,
                 packs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self._tokens, self._rows, self._packs = tokens, rows, packs

    def __len__(self) -> int:
        return len(self._rows) if self._packs is None else len(self._packs[1]) - 1

    def longest(self) -> tuple[int, int]:
        """(tokens, kept labels) of the longest row and of the row keeping the most labels: what
        one row of a micro-batch can hold at most (`qlora.memory.RowTokens`)."""
        lens, kept = self._tokens.extents()
        if self._packs is None:
            return int(lens[self._rows].max(initial=0)), int(kept[self._rows].max(initial=0))
        members, offsets = self._packs
        if len(members) == 0:
            return 0, 0
        starts = offsets[:-1]
        return (int(np.add.reduceat(lens[members], starts).max()),
                int(np.add.reduceat(kept[members], starts).max()))

    def _item(self, i: int) -> Example:
        if self._packs is None:
            return self._tokens.example(int(self._rows[i]))
        members, offsets = self._packs
        ids, labels, positions = [], [], []
        for j in members[offsets[i]:offsets[i + 1]].tolist():
            ex = self._tokens.example(j)
            ids += ex.input_ids
            # The first token of each example is predicted from the previous example's last
            # token in a packed row: mask that label so no loss crosses the boundary.
            labels += [IGNORE] + ex.labels[1:]
            positions += range(len(ex.input_ids))
        return Example(ids, labels, positions)

    def __repr__(self) -> str:
        return f"Examples({len(self)} rows)"


