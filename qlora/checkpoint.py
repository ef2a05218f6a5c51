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

A step folder is written under a temporary name and renamed, then `latest` is replaced
atomically, so a kill at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP = 2  # complete checkpoints kept per trial


def trial_dir(root: str | Path, trial_id: str) -> Path:
    return Path(root) / trial_id


def save(root: str | Path, trial_id: str, adapter: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write one checkpoint of trial `trial_id` at `state["step"]`; returns its folder."""
    folder = trial_dir(root, trial_id)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    tensors, scalars = _split_optimizer(optimizer.state_dict())
    save_file(adapter, tmp / "adapter.safetensors")
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": scalars}))
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = folder / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, folder / "latest")
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load(root: str | Path, trial_id: str):
    """The newest complete checkpoint of `trial_id` as (adapter, optimizer_state, state), or None."""
    folder = trial_dir(root, trial_id)
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    step_dir = folder / pointer.read_text().strip()
    state = json.loads((step_dir / "state.json").read_text())
    adapter = load_file(step_dir / "adapter.safetensors")
    optimizer = _join_optimizer(load_file(step_dir / "optimizer.safetensors"),
                                state.pop("optimizer"))
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
