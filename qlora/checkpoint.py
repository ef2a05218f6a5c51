"""Per-trial checkpoints: safetensors and JSON only (never pickle), written atomically.

A trial's randomness is all derived from its seed and its own counters (init from the seed, dropout
masks from the micro-step, data order from the epoch), so a checkpoint needs only: the adapter
weights, the optimizer state, the counters (step, micro-step), the data position (epoch, offset)
and the histories of losses. Restoring those continues the trial exactly where it was.

Layout, under `<root>/<trial_id>/`:

    step-000040/adapter.safetensors     adapter weights (module path keys)
    step-000040/optimizer.safetensors   optimizer tensors, keyed "<param index>/<name>"
    step-000040/state.json              counters, data position, histories, optimizer scalars
    latest                              the name of the newest complete step folder
    owner                               the attempt that may write (`claim`, `holds`)

A storage call that fails for a reason that may pass (a full disk, a bucket that stops
answering: `OSError`, the S3 clients' own errors) is tried again with backoff for `patience`
seconds (the worker sets `cluster.lost_timeout_s`), then raises `StorageUnavailable`: the sweep
stops resumable rather than fail its trials. A missing file is an answer, never retried.

On a local disk a step folder is written under a temporary name, its files and folder synced
to disk (fsync), and renamed; then `latest` is replaced the same way, so a kill or a power loss
at any moment leaves the previous checkpoint intact and pointed to. `root` may instead be a URI
(`s3://bucket/prefix`, `gs://...`: anything fsspec serves): the step's objects are put first and
`latest` last (one put, atomic on object stores), written from memory, never to a local file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

KEEP = 2  # complete checkpoints kept per trial
log = logging.getLogger(__name__)


FILES = ("adapter.safetensors", "optimizer.safetensors", "state.json")
OWNER = "owner"
_PATIENCE = [120.0]  # seconds a failing storage call is tried again (`patience`)
_BACKOFF = (0.5, 15.0)  # the first wait between tries, doubled up to the second


class StorageUnavailable(OSError):
    """Checkpoint storage that failed every try for the patience: full, unreachable, refusing."""


@contextlib.contextmanager
def patience(seconds: float | None):
    """Within it, a failing storage call is tried again for `seconds` (None: the default, 120)."""
    before = _PATIENCE[0]
    _PATIENCE[0] = before if seconds is None else float(seconds)
    try:
        yield
    finally:
        _PATIENCE[0] = before


def transient(error: BaseException) -> bool:
    """May trying again help? A full disk, a refused or dropped connection, a timeout, a 5xx:
    yes; a missing file (an answer) or a bug (TypeError, ...): no."""
    if isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(error, OSError):
        return True
    return type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp",
                                                    "urllib3", "requests", "google")


def patiently(what: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, tried again with backoff while it fails `transient`ly, for the
    patience; then `StorageUnavailable` naming `what` and the last error."""
    began, wait, warned = time.monotonic(), _BACKOFF[0], False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not transient(e):
                raise
            waited = time.monotonic() - began
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if waited >= _PATIENCE[0]:
                full = " (the disk is full)" if getattr(e, "errno", None) == errno.ENOSPC else ""
                raise StorageUnavailable(f"{what}: failed for {waited:.0f} s{full}: {why}") from e
            if not warned:
                log.warning("%s failed (%s); trying again for up to %g s", what, why,
                            _PATIENCE[0])
                warned = True
            time.sleep(min(wait, max(0.0, _PATIENCE[0] - waited)))
            wait = min(2 * wait, _BACKOFF[1])


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def is_uri(root: str | Path) -> bool:
    """True for `scheme://...` (fsspec), False for a local path (`file://` included)."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def trial_dir(root: str | Path, trial_id: str) -> Path:
    return Path(str(root).removeprefix("file://")) / trial_id


def save(root: str | Path, trial_id: str, adapter: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, state: dict) -> Path | str:
    """Write one checkpoint of trial `trial_id` at `state["step"]`; returns its folder."""
    name = _step_name(state["step"])
    tensors, scalars = _split_optimizer(optimizer.state_dict())
    blobs = {"adapter.safetensors": save_bytes(adapter),
             "optimizer.safetensors": save_bytes(tensors),
             "state.json": json.dumps({**state, "optimizer": scalars}).encode()}
    write = _put_remote if is_uri(root) else _put_local
    return patiently(f"checkpoint of trial {trial_id} at step {state['step']} in {root}", write,
                     str(root), trial_id, name, blobs)


def _put_local(root: str, trial_id: str, name: str, blobs: dict[str, bytes]) -> Path:
    folder = trial_dir(root, trial_id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        for file, data in blobs.items():
            _write_synced(tmp / file, data)
        _sync(tmp)
    except OSError:  # a full disk, say: the half-written step frees its room before a retry
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _sync(folder)  # the rename itself is on disk before `latest` may name it
    pointer = folder / ".latest.tmp"
    _write_synced(pointer, name.encode())
    os.replace(pointer, folder / "latest")
    _sync(folder)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for half in folder.glob(".step-*"):  # what a write killed before its rename left behind
        shutil.rmtree(half, ignore_errors=True)
    return final


def claim(root: str | Path, trial_id: str, token: str) -> None:
    """Make `token` (one attempt at the trial, on some worker) the only one that may write its
    checkpoints from now on: an attempt sent again after its worker was lost or partitioned
    claims the trial, and the earlier one, if it comes back, sees that it lost it (`holds`)."""
    patiently(f"claim of trial {trial_id} in {root}", _claim, root, trial_id, token)


def _claim(root: str | Path, trial_id: str, token: str) -> None:
    if is_uri(root):
        fs, base = _fs(str(root))
        fs.pipe_file(f"{base}/{trial_id}/{OWNER}", token.encode())
        return
    folder = trial_dir(root, trial_id)
    folder.mkdir(parents=True, exist_ok=True)
    pointer = folder / f".{OWNER}.{os.getpid()}.tmp"
    _write_synced(pointer, token.encode())
    os.replace(pointer, folder / OWNER)


def holds(root: str | Path, trial_id: str, token: str) -> bool:
    """True while `token`'s claim on the trial stands (no later attempt claimed it)."""
    def owner() -> str:
        if is_uri(root):
            fs, base = _fs(str(root))
            fs.invalidate_cache(f"{base}/{trial_id}")
            return fs.cat_file(f"{base}/{trial_id}/{OWNER}").decode()
        return (trial_dir(root, trial_id) / OWNER).read_text()

    try:
        return patiently(f"claim of trial {trial_id} in {root}", owner) == token
    except FileNotFoundError:
        return True  # never claimed: written by a caller that does not fence


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fs(root: str):
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(root)
    return fs, path.rstrip("/")


def _put_remote(root: str, trial_id: str, name: str, blobs: dict[str, bytes]) -> str:
    fs, base = _fs(root)
    folder = f"{base}/{trial_id}"
    for file, data in blobs.items():
        fs.pipe_file(f"{folder}/{name}/{file}", data)
    fs.pipe_file(f"{folder}/latest", name.encode())  # published only once the step is whole
    fs.invalidate_cache(folder)
    steps = sorted(p for p in fs.ls(folder, detail=False) if p.rsplit("/", 1)[-1].startswith("step-"))
    for old in steps[:-KEEP]:
        fs.rm(old, recursive=True)
    return f"{root.rstrip('/')}/{trial_id}/{name}"


def remove(root: str | Path) -> None:
    """Delete a checkpoint root and everything under it (a finished sweep's), local or URI."""
    if is_uri(root):
        fs, base = _fs(str(root))
        if fs.exists(base):
            fs.rm(base, recursive=True)
    else:
        shutil.rmtree(trial_dir(root, ""), ignore_errors=True)


def check_folder(folder: str | Path) -> str:
    """The trial id of a trial checkpoint folder (`<root>/<trial_id>/` as `save` writes it), or
    ValueError saying what is missing: the folder, its `latest` pointer, the step folder it names
    with its three files, or a `state.json` of this trial."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    pointer = folder / "latest"
    if not pointer.is_file():
        raise ValueError(f"{folder}: not a trial checkpoint folder (no 'latest' file; give "
                         "<checkpoint_dir>/<parent run id>/<trial id>)")
    step_dir = folder / pointer.read_text().strip()
    missing = [n for n in ("adapter.safetensors", "optimizer.safetensors", "state.json")
               if not (step_dir / n).is_file()]
    if missing:
        raise ValueError(f"{folder}: 'latest' names {step_dir.name!r}, which lacks "
                         f"{', '.join(missing)}")
    try:
        state = json.loads((step_dir / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{step_dir / 'state.json'}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("trial_id") != folder.name:
        raise ValueError(f"{step_dir / 'state.json'}: not a checkpoint of trial {folder.name!r}")
    return folder.name


def load(root: str | Path, trial_id: str, step: int | None = None):
    """The newest complete, readable checkpoint of `trial_id` as (adapter, optimizer_state,
    state), or None; with `step`, the one of that step (None if it is not kept or unreadable).
    A `latest` that cannot be read (truncated by a full disk, say) falls back to the checkpoint
    kept before it, with a warning: only that trial goes back."""
    what = f"checkpoint of trial {trial_id} in {root}"
    if is_uri(root):
        fs, base = _fs(str(root))
        folder = f"{base}/{trial_id}"

        def listing():
            if not fs.exists(f"{folder}/latest"):
                return None, []
            return (fs.cat_file(f"{folder}/latest").decode().strip(),
                    [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)])

        def reader(name: str):
            return lambda file: patiently(what, fs.cat_file, f"{folder}/{name}/{file}")
    else:
        folder = trial_dir(root, trial_id)

        def listing():
            pointer = folder / "latest"
            if not pointer.exists():
                return None, []
            return pointer.read_text().strip(), [p.name for p in folder.iterdir()]

        def reader(name: str):
            return lambda file: patiently(what, (folder / name / file).read_bytes)
    latest, kept = patiently(what, listing)
    if latest is None:
        return None
    kept = sorted(kept, reverse=True)
    if step is not None:
        names = [_step_name(step)]
    else:  # latest first, then the older complete ones, newest first
        names = [latest, *(n for n in kept if n.startswith("step-") and n < latest)]
    for name in names:
        try:
            return _read(reader(name))
        except (FileNotFoundError, StorageUnavailable) as e:
            if isinstance(e, StorageUnavailable):
                raise
            continue
        except Exception as e:  # noqa: BLE001 - safetensors, JSON, a half object: unreadable
            log.warning("checkpoint %s/%s of trial %s is unreadable (%s); trying the one before",
                        folder, name, trial_id, e)
    return None


def _read(read):
    state = json.loads(read("state.json"))
    adapter = load_bytes(read("adapter.safetensors"))
    optimizer = _join_optimizer(load_bytes(read("optimizer.safetensors")), state.pop("optimizer"))
    return adapter, optimizer, state


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors-able tensors plus JSON-able everything else.

    Per-parameter entries may nest (bitsandbytes keeps its tensors in a sub-dict); every leaf is
    keyed by its path "<param index>/<key>/<subkey>...".
    """
    tensors: dict[str, torch.Tensor] = {}
    leaves: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}/{key}", sub)
        elif torch.is_tensor(value):
            tensors[prefix] = value.detach().cpu().contiguous()
        else:
            leaves[prefix] = value

    for pid, entry in sd["state"].items():
        walk(str(pid), entry)
    return tensors, {"param_groups": sd["param_groups"], "leaves": leaves}


def _join_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict = {}
    for path, value in [*scalars["leaves"].items(), *tensors.items()]:
        pid, *keys = path.split("/")
        node = state.setdefault(int(pid), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return {"state": state, "param_groups": scalars["param_groups"]}
