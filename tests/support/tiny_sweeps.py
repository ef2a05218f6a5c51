"""Tiny real sweeps for the search tests: the tiny model, a few steps, real Ray and MLflow (SQLite).

`run(root, sweep, ...)` runs `run_sweep` and returns what the tests read back: the exit code,
the summary, the parent run and the trial runs by trial id.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from orchestrator.config.schema import (
    ClusterCfg,
    Config,
    DataCfg,
    OptunaCfg,
    PackCfg,
    QuantCfg,
    SweepDef,
    TrackingCfg,
    TrainCfg,
)
from orchestrator.tracking.keys import ROLE_TAG, TRIAL_ID_TAG, TRIAL_SEED_TAG

MAX_STEPS = 8
SEED = 7
#: 6 trials whose eval losses spread well after 2 and 4 steps (the learning rate dominates).
SPACE = {"lora.r": [4, 8], "train.learning_rate": [1e-4, 1e-3, 3e-3]}
#: The Optuna sweep: 2 rounds of 2 proposals on one worker with 2 slots.
OPTUNA_SPACE = {"lora.r": [4, 8],
                "lora.alpha": {"low": 8.0, "high": 64.0, "log": True, "type": "int"},
                "train.learning_rate": {"low": 1e-4, "high": 5e-3, "log": True, "type": "float"}}
REGISTERED = "best"


def config(root: Path, sweep: SweepDef, *, max_adapters: int = 2, num_workers: int = 1,
           register_as: str | None = None) -> Config:
    """A sweep config writing everything under `root`."""
    return Config(
        train=TrainCfg(max_steps=MAX_STEPS, seq_len=64, micro_batch_size=2, eval_every=4),
        data=DataCfg(max_eval_examples=16),
        quant=QuantCfg(compute_dtype="float32"),  # as model=tiny sets: bf16 is slow on CPUs
        pack=PackCfg(max_adapters=max_adapters),
        cluster=ClusterCfg(num_workers=num_workers),
        tracking=TrackingCfg(uri=f"sqlite:///{root}/mlflow.db",
                             artifact_location=str(root / "mlartifacts"), register_as=register_as),
        sweep=sweep, seed=SEED, output_dir=str(root / "outputs"),
    )


def asha_sweep() -> SweepDef:
    sweep = SweepDef(name="asha_t", params=dict(SPACE), scheduler="asha")
    sweep.asha = dataclasses.replace(sweep.asha, rungs=[0.25, 0.5], eta=2.0)
    return sweep


def optuna_sweep() -> SweepDef:
    return SweepDef(name="optuna_t", strategy="optuna", num_trials=4, params=dict(OPTUNA_SPACE),
                    optuna=OptunaCfg(startup_trials=2, batch_size=2))


@dataclasses.dataclass
class SweepRun:
    exit_code: int
    root: Path
    config: Config
    client: object  # MlflowClient
    parent: object  # mlflow Run
    children: dict  # trial_id -> mlflow Run
    summary: dict

    def rows(self) -> dict:
        return {r["trial_id"]: r for r in self.summary["trials"]}


def run(root: Path, cfg: Config) -> SweepRun:
    """`run_sweep(cfg)` and what it left in MLflow and in its summary."""
    from mlflow import MlflowClient

    from orchestrator.config.validate import validate
    from orchestrator.sweep import run_sweep

    cfg = validate(dataclasses.asdict(cfg))  # normalized sweep params, as from the command line
    exit_code = run_sweep(cfg)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = {r.data.tags[TRIAL_ID_TAG]: r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"}
    summary = json.loads((root / "outputs" / cfg.sweep.name / "latest" / "summary.json").read_text())
    return SweepRun(exit_code, root, cfg, client, parent, children, summary)


#: The engine's TrialSpec fields and the MLflow params that record them (DataSpec's under data.).
SPEC_PARAMS = {
    "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
    "target_modules": "lora_target_modules", "use_rslora": "lora_use_rslora",
    "rank_pattern": "lora_rank_pattern", "alpha_pattern": "lora_alpha_pattern",
    "init": "lora_init", "loftq_iter": "lora_loftq_iter",
    "learning_rate": "learning_rate", "warmup_ratio": "train_warmup_ratio",
    "num_epochs": "train_num_epochs",
    "weight_decay": "train_weight_decay", "warmup_steps": "train_warmup_steps",
    "lr_schedule": "train_lr_schedule", "max_steps": "train_max_steps",
    "micro_batch_size": "train_micro_batch_size", "grad_accum_steps": "train_grad_accum_steps",
    "max_grad_norm": "train_max_grad_norm", "optimizer": "train_optimizer",
    "eval_every": "train_eval_every", "inject_oom_at_step": "train_inject_oom_at_step",
    "eval_samples": "eval_num_samples", "eval_max_new_tokens": "eval_max_new_tokens",
    "eval_metric": "eval_metric",
    "data.path": "data_path", "data.format": "data_format", "data.eval_path": "data_eval_path",
    "data.eval_fraction": "data_eval_fraction", "data.seq_len": "train_seq_len",
    "data.train_on_prompt": "data_train_on_prompt", "data.skip_invalid": "data_skip_invalid",
    "data.packing": "data_packing", "data.max_eval_examples": "data_max_eval_examples",
    "data.name": "data_name", "data.split": "data_split", "data.revision": "data_revision",
    "data.mix": "data_mix",
}


def _same(logged: str, used) -> bool:
    if isinstance(used, list | tuple) and all(isinstance(u, list | tuple) for u in used) and used:
        return json.loads(logged) == dict(used)  # rank_pattern / alpha_pattern: a JSON mapping
    if used in ((), []) and logged in ("{}", "[]"):
        return True
    if isinstance(used, list | tuple) and all(isinstance(u, dict) for u in used):
        return json.loads(logged) == list(used)  # data.mix: its sources
    if isinstance(used, list | tuple):
        return logged == ",".join(map(str, used))
    if isinstance(used, bool) or used is None or isinstance(used, str):
        return logged == str(used)
    return float(logged) == float(used)


def assert_params_are_what_ran(run: SweepRun) -> int:
    """Every trial's MLflow params equal the spec its worker trained with (the summary's
    `trained`, returned by the worker); returns how many trials were checked."""
    checked = 0
    for row in run.summary["trials"]:
        if row["trained"] is None:
            continue
        params = run.children[row["trial_id"]].data.params
        trained = {**{k: v for k, v in row["trained"].items() if k != "data"},
                   **{f"data.{k}": v for k, v in row["trained"]["data"].items()}}
        unmapped = set(trained) - set(SPEC_PARAMS) - {"trial_id", "name", "seed"}
        assert not unmapped, f"TrialSpec fields with no param: {unmapped}"
        tags = run.children[row["trial_id"]].data.tags
        assert tags[TRIAL_SEED_TAG] == str(trained["seed"]), (row["name"], tags[TRIAL_SEED_TAG])
        for field, param in SPEC_PARAMS.items():
            assert _same(params[param], trained[field]), (row["name"], param, params[param],
                                                          trained[field])
        checked += 1
    return checked
