"""The best adapter, registered: `tracking.register_as=NAME` -> `models:/NAME@champion`.

At the end of a sweep the trial with the lowest final eval_loss among those that finished gets a
new version of the registered model NAME (created if needed) whose source is its run's `adapter/`
artifacts, and the alias `champion` moves to that version. The version carries its lineage as
tags, enough to rebuild the exact base it was trained on (`orchestrator.load` reads them):

    qlora.base_model, qlora.base_revision        the base (`tiny`, a folder, or a hub id)
    qlora.base_commit                            its hub commit, or sha256: of its folder's files
    qlora.base_gguf_file, qlora.base_gguf_sha256 the GGUF file it was converted from, if any
    qlora.quant_type, qlora.quant_double_quant,  how the base was quantized
    qlora.quant_compute_dtype
    qlora.data_hash                              sha256 (16 hex) of the training data file(s)
    qlora.code_version                           git commit (+dirty) of this code, or its version
    qlora.trial_id, qlora.eval_loss, qlora.sweep, qlora.parent_run_id, qlora.run_id

The adapter itself is PEFT's format (adapter_config.json + adapter_model.safetensors), so any PEFT
consumer can use the files; only the loader needs the tags.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from orchestrator.tracking.keys import (
    ADAPTER_DIR,
    BASE_TAG_PREFIX,
    CHAMPION_ALIAS,
    DATA_TAG_PREFIX,
    LINEAGE_PREFIX,
)

#: Run params that name the base and its quantization -> the lineage tag that carries each.
BASE_PARAMS = {
    "model_name_or_path": "base_model",
    "model_revision": "base_revision",
    "model_commit": "base_commit",
    "model_trust_remote_code": "base_trust_remote_code",
    "quant_type": "quant_type",
    "quant_double_quant": "quant_double_quant",
    "quant_compute_dtype": "quant_compute_dtype",
}


@functools.cache
def code_version() -> str:
    """The git commit of the checkout this code runs from (`+dirty` when it has changes), or the
    installed package's version when it is not a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "qlora", "orchestrator"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"qlora-orchestrator=={version('qlora-orchestrator')}"
        except PackageNotFoundError:
            return "unknown"


def lineage(run, *, sweep: str, parent_run_id: str | None, eval_loss: float | None,
            trial_id: str) -> dict[str, str]:
    """The version tags of the trial run `run` (see the module's docstring)."""
    params, tags = run.data.params, run.data.tags
    out = {LINEAGE_PREFIX + tag: params[param] for param, tag in BASE_PARAMS.items()
           if param in params}
    out.update({LINEAGE_PREFIX + "base_" + k[len(BASE_TAG_PREFIX):]: v for k, v in tags.items()
                if k.startswith(BASE_TAG_PREFIX)})
    out[LINEAGE_PREFIX + "data_hash"] = tags.get(DATA_TAG_PREFIX + "data_hash", "unknown")
    out[LINEAGE_PREFIX + "code_version"] = code_version()
    out[LINEAGE_PREFIX + "trial_id"] = trial_id
    out[LINEAGE_PREFIX + "run_id"] = run.info.run_id
    out[LINEAGE_PREFIX + "sweep"] = sweep
    if parent_run_id:
        out[LINEAGE_PREFIX + "parent_run_id"] = parent_run_id
    if eval_loss is not None:
        out[LINEAGE_PREFIX + "eval_loss"] = f"{eval_loss:.6g}"
    return out


def register_adapter(client, name: str, run_id: str, tags: dict[str, str],
                     description: str | None = None, alias: str = CHAMPION_ALIAS):
    """A new version of the registered model `name` from run `run_id`'s `adapter/` artifacts,
    tagged with `tags`, and `alias` moved to it; returns the `ModelVersion`."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(
            name, description="LoRA adapters registered by qlora-orchestrator sweeps; the alias "
                              f"'{CHAMPION_ALIAS}' is the best one. Load with: python -m "
                              f"orchestrator.load models:/{name}@{CHAMPION_ALIAS}")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ADAPTER_DIR}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                          description=description)
    client.set_registered_model_alias(name, alias, version.version)
    return version


def register_best(client, name: str, row: dict, *, sweep: str,
                  parent_run_id: str | None, objective=None):
    """Register the summary row `row` (the sweep's best trial by `objective`, an
    `orchestrator.search.objective.Objective`) as `models:/name@champion`."""
    run = client.get_run(row["run_id"])
    tags = lineage(run, sweep=sweep, parent_run_id=parent_run_id, eval_loss=row.get("eval_loss"),
                   trial_id=row["trial_id"])
    judged = f"eval_loss {row.get('eval_loss')}"
    if objective is not None:
        judged = f"{objective.metric} {objective.of_row(row)} ({objective.mode})"
        tags[LINEAGE_PREFIX + "objective"] = f"{objective.metric} ({objective.mode})"
        tags[LINEAGE_PREFIX + objective.metric] = f"{objective.of_row(row):.6g}"
    description = (f"best of sweep {sweep} (parent run {parent_run_id}): trial {row['name']}, "
                   f"{judged}")
    return register_adapter(client, name, row["run_id"], tags, description)
