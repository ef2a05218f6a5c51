"""Every name this project writes into MLflow: tags, params, metrics, artifact folders.

One place, so the tracker, the registry, the loader, the report and the tests agree (layout in
README.md, "What you get"). `trial_params` is a trial's config as MLflow params.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from orchestrator.config.schema import Config

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from orchestrator.search.trials import Trial

# Tags
ROLE_TAG = "qlora.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
TRIAL_ID_TAG = "qlora.trial_id"
TRIAL_SEED_TAG = "qlora.trial_seed"  # the seed of its init and data order (from seed + its config)
FAILURE_TAG = "qlora.failure"
STATUS_TAG = "qlora.status"  # the engine's word: finished | stopped | diverged | failed
PACK_TAG = "qlora.pack_id"
MEMORY_ESTIMATE_TAG = "qlora.memory_estimate_bytes"  # the pack's qlora.estimate_memory total
MEMORY_PEAK_TAG = "qlora.memory_peak_bytes"  # its measured peak (CUDA max allocated / CPU RSS)
NODE_TAG = "qlora.node_id"
DEVICES_TAG = "qlora.cuda_visible_devices"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The runs view the console's URL opens (MLflow 3's shared view state, an experiment tag): the
# columns a sweep is judged by, best eval_loss first, the latest sweep's trials shown.
RUNS_VIEW_KEY = "qlora-runs"
RUNS_VIEW_TAG = "mlflow.sharedViewState." + RUNS_VIEW_KEY
RUNS_VIEW_ORDER = "metrics.`eval_loss`"
RUNS_VIEW_COLUMNS = ("params.`lora_r`", "params.`lora_alpha`", "params.`learning_rate`",
                     RUNS_VIEW_ORDER, "params.`quant_type`", "params.`lora_init`",
                     "metrics.`base_bits_per_weight`", "metrics.`memory_peak_mib`")
DATA_TAG_PREFIX = "qlora.data."  # + data_hash, n_train, n_eval, n_truncated, n_skipped, ...
BASE_TAG_PREFIX = "qlora.base."  # + gguf_file, gguf_sha256: a base converted from a GGUF file
STEPS_TAG = "qlora.steps"  # optimizer steps the trial ran
RESTARTS_TAG = "qlora.restarts"  # times the trial went again from its checkpoint after a lost worker
OOM_SPLITS_TAG = "qlora.oom_splits"  # times its pack was split after running out of device memory
CHECKPOINT_DIR_TAG = "qlora.checkpoint_dir"  # on the parent: where its trials checkpoint
RESUMES_TAG = "qlora.resumes"  # on the parent: how many times `resume=true` continued it
# On the parent while its driver lives: who holds the sweep ({"host", "pid"}, JSON) and when it
# last said so (unix seconds), renewed every HEARTBEAT_S; resume=true takes only a sweep whose
# driver is gone (see orchestrator.tracking.lease).
DRIVER_TAG = "qlora.driver"
HEARTBEAT_TAG = "qlora.heartbeat"
HEARTBEAT_S = 30.0
LEASE_S = 3 * HEARTBEAT_S  # a heartbeat older than this: its driver is gone
# A trial stopped by the search (status FINISHED, qlora.status=stopped): where and why.
STOPPED_AT_RUNG_TAG = "qlora.stopped_at_rung"  # 1-based rung (sweep.asha.rungs)
STOPPED_AT_STEP_TAG = "qlora.stopped_at_step"  # the rung's step
STOP_REASON_TAG = "qlora.stop_reason"
BEST_TRIAL_TAG = "qlora.best_trial_id"  # on the parent: the trial with the lowest final eval_loss
BEST_RUN_TAG = "qlora.best_run_id"
# Model Registry (orchestrator/tracking/registry.py): the alias of the best adapter and its lineage tags.
CHAMPION_ALIAS = "champion"
LINEAGE_PREFIX = "qlora."  # + base_model, base_revision, quant_type, quant_double_quant,
#                            quant_compute_dtype, data_hash, code_version, trial_id, eval_loss, ...
REGISTERED_TAG = "qlora.registered_as"  # on the parent: models:/NAME/VERSION of the best adapter
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# Metrics
TRAIN_LOSS = "train_loss"
LR_METRIC = "lr"  # the schedule's value at each step (the param `learning_rate` is its peak)
EVAL_LOSS = "eval_loss"
# What a trial's base costs, logged at its end (one table with eval_loss: quant.type x lora.init).
BITS_METRIC = "base_bits_per_weight"  # storage of the base's linears, measured from its tensors
MEMORY_PEAK_METRIC = "memory_peak_mib"  # its pack's measured peak (MEMORY_PEAK_TAG, in MiB)
SAMPLES_DIR = "samples"  # on a child: samples/step_000040.json, a table per evaluation
# On the parent: the run's description (markdown) in the UI, here the leaderboard.
NOTE_TAG = "mlflow.note.content"
# Artifacts
ADAPTER_DIR = "adapter"
LINEAGE_TAG = "qlora.pbt_lineage"  # PBT: whose state a trial took, at which step, with what
REPORT_DIR = "report"  # on the parent: the sweep's plots (orchestrator/report.py)

#: Params whose names are promised as they are; every other setting is `<section>_<key>`.
PARAM_NAMES = {("lora", "r"): "lora_r", ("lora", "alpha"): "lora_alpha",
               ("train", "learning_rate"): "learning_rate"}
TRIAL_SECTIONS = ("model", "data", "quant", "lora", "train", "eval")
FLUSH_INTERVAL_S = 1.0
MAX_TAG_CHARS = 5000  # MLflow caps tag values at 8000
BATCH_METRICS = 1000  # MLflow's per-call limits
BATCH_PARAMS = 100


def trial_params(trial: Trial) -> dict[str, str]:
    """Every setting of a trial's config flattened to MLflow params (`lora_r`, `train_max_steps`...)."""
    cfg = trial.config
    params: dict[str, str] = {}
    for section in TRIAL_SECTIONS:
        for key, value in asdict(getattr(cfg, section)).items():
            if (section, key) == ("data", "mix"):  # each source as the engine reads it
                from qlora.config import mix_sources

                value = json.dumps([asdict(m) for m in mix_sources(value)] if value else [],
                                   sort_keys=True)
            params[PARAM_NAMES.get((section, key), f"{section}_{key}")] = _param_value(value)
    params["seed"] = _param_value(cfg.seed)
    params.update(commit_param(cfg.model.name_or_path, cfg.model.revision))
    return params


@functools.cache
def commit_param(name_or_path: str, revision: str | None) -> dict[str, str]:
    """{'model_commit': the base's hub commit, or sha256: of its folder} (`qlora.base.base_commit`,
    once per sweep), which `orchestrator.load` pins and checks; {} when it cannot be told."""
    from qlora.base import base_commit
    from qlora.config import BaseSpec

    try:
        return {"model_commit": base_commit(BaseSpec(name_or_path=name_or_path,
                                                     revision=revision))}
    except Exception as e:  # noqa: BLE001 - the preflight loaded this base; record, never stop
        log.warning("the commit of base %s is not recorded: %s", name_or_path, e)
        return {}


def sweep_params(config: Config, num_trials: int, extra: dict | None = None) -> dict[str, str]:
    """The parent run's params: the sweep definition and how it was scheduled."""
    sweep = config.sweep
    params = {
        "sweep_name": sweep.name,
        "sweep_strategy": sweep.strategy,
        "sweep_params": json.dumps(sweep.params, sort_keys=True, default=str),
        "sweep_num_trials": sweep.num_trials,
        "sweep_objective": sweep.objective,
        "sweep_mode": sweep.mode,
        "num_trials": num_trials,
        "seed": config.seed,
        "pack_max_adapters": config.pack.max_adapters,
        "cluster_address": config.cluster.address,
    }
    params.update(extra or {})
    return {k: _param_value(v) for k, v in params.items()}


def _param_value(value) -> str:
    """A value as the UI should show it: integral numbers without `.0` (`32`, not `32.0`), lists
    comma-joined, mappings as JSON; float(logged) still equals the value trained."""
    if isinstance(value, (list, tuple)):
        return ",".join(_param_value(v) for v in value)
    if isinstance(value, dict):
        return _truncate(json.dumps(value, sort_keys=True))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return _truncate(str(value))


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


def samples_file(step: int) -> str:
    """The artifact path of a trial's samples table at `step`."""
    return f"{SAMPLES_DIR}/step_{int(step):06d}.json"


def is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file", "sqlite")


@functools.cache
def base_tags(name_or_path: str) -> dict[str, str]:
    """The GGUF file a base was converted from and its sha256 (hashed once per sweep), if any."""
    from qlora.models import gguf_lineage

    return {BASE_TAG_PREFIX + k: v for k, v in gguf_lineage(name_or_path).items()}


def lineage_text(exploits: list[dict]) -> str:
    """A trial's PBT lineage for `LINEAGE_TAG`: `step 10: from <trial> (learning_rate 0.00016,
    ...)`, one entry per exploit, oldest first."""
    return "; ".join(
        f"step {e['step']}: from {e['source']} ("
        + ", ".join(f"{k} {v:.3g}" for k, v in e["values"].items()) + ")" for e in exploits)
