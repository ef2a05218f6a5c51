"""The typed configuration of a sweep: what `conf/` and `sweeps/` compose into.

Hydra composes plain YAML; `orchestrator.config.validate.validate(cfg)` turns the composed node into a
`Config` here, checking every key once (type, range, allowed values) and raising `ConfigError`
that names the key. Inside the orchestrator and its Ray workers only these dataclasses travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.config import BaseSpec, DataSpec, TrialSpec


@dataclass
class ModelCfg:
    name_or_path: str = "tiny"  # "tiny" (built locally), a local folder, or a hub id
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataCfg:
    path: str | None = None  # None = the bundled dataset
    format: str = "auto"
    eval_path: str | None = None
    eval_fraction: float = 0.1
    train_on_prompt: bool = False
    skip_invalid: bool = False
    packing: str = "none"
    max_eval_examples: int | None = 128


@dataclass
class QuantCfg:
    type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class LoraCfg:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class TrainCfg:
    learning_rate: float = 2e-4
    max_steps: int = 100
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    seq_len: int = 256
    optimizer: str = "paged_adamw_32bit"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0
    gradient_checkpointing: bool = True
    activation_offload: bool = False
    checkpoint_every: int = 20  # steps between a trial's checkpoints (and one at its end)
    # Testing only: raise CUDA's out-of-memory error at this step while the trial shares a pack
    # with others (simulates a pack too big for the device). Never part of a trial's id.
    inject_oom_at_step: int | None = None


@dataclass
class PackCfg:
    max_adapters: int = 4


@dataclass
class ClusterCfg:
    address: str = "local"  # local | auto | ray://host:port
    num_workers: int | None = None  # None = one per GPU, or one per CPU core without GPUs
    gpus_per_worker: float | None = None  # None = 1 where the cluster has GPUs, else 0
    max_retries: int = 2
    checkpoint_dir: str | None = None  # None = <output_dir>/<sweep name>/checkpoints


@dataclass
class TrackingCfg:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "qlora-sweeps"
    artifact_location: str = "mlartifacts"  # for a new experiment on a local store
    # Register the best trial's adapter in the Model Registry under this name, alias `champion`
    # (None = do not register). See orchestrator/registry.py.
    register_as: str | None = None


@dataclass
class AshaCfg:
    """Successive halving's rungs (see orchestrator/asha.py)."""

    rungs: list[float] = field(default_factory=lambda: [0.25, 0.5])  # fractions of max_steps
    eta: float = 3.0  # past each rung, the best 1/eta of the sweep's trials continue


@dataclass
class OptunaCfg:
    """Model-based search (see orchestrator/optuna_search.py)."""

    startup_trials: int = 8  # proposals drawn at random before TPE models the results
    batch_size: int | None = None  # proposals per round; None = every adapter slot of the sweep


@dataclass
class SweepDef:
    """A sweep from `sweeps/`: how to turn the base config into trials."""

    name: str = "single"
    strategy: str = "grid"  # grid | random | optuna
    # dotted trial key -> list of values (grid, random, optuna) or {low, high, log} (random, optuna)
    params: dict = field(default_factory=dict)
    num_trials: int | None = None  # random: how many trials to draw; optuna: the trial budget
    scheduler: str = "none"  # none | asha: stop the worse trials at rungs, backfill their slots
    asha: AshaCfg = field(default_factory=AshaCfg)
    optuna: OptunaCfg = field(default_factory=OptunaCfg)


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    quant: QuantCfg = field(default_factory=QuantCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    pack: PackCfg = field(default_factory=PackCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    sweep: SweepDef = field(default_factory=SweepDef)
    seed: int = 0
    resume: bool = False
    output_dir: str = "outputs"
    dry_run: bool = False  # print the sweep's trials and exit without starting Ray or MLflow

    def base_spec(self) -> BaseSpec:
        """The frozen base every trial of this config trains on."""
        return BaseSpec(
            name_or_path=self.model.name_or_path,
            revision=self.model.revision,
            trust_remote_code=self.model.trust_remote_code,
            quant_type=self.quant.type,
            double_quant=self.quant.double_quant,
            compute_dtype=self.quant.compute_dtype,
            gradient_checkpointing=self.train.gradient_checkpointing,
            activation_offload=self.train.activation_offload,
        )

    def data_spec(self) -> DataSpec:
        d = self.data
        return DataSpec(
            path=d.path, format=d.format, eval_path=d.eval_path, eval_fraction=d.eval_fraction,
            seq_len=self.train.seq_len, train_on_prompt=d.train_on_prompt,
            skip_invalid=d.skip_invalid, packing=d.packing, max_eval_examples=d.max_eval_examples,
        )

    def trial_spec(self, trial_id: str, name: str, seed: int) -> TrialSpec:
        """This config as one trial (a sweep applies its per-trial values first)."""
        t, lo = self.train, self.lora
        tm = lo.target_modules if isinstance(lo.target_modules, str) else tuple(lo.target_modules)
        return TrialSpec(
            trial_id=trial_id, name=name, seed=seed,
            r=lo.r, alpha=float(lo.alpha), dropout=lo.dropout, target_modules=tm,
            learning_rate=t.learning_rate, weight_decay=t.weight_decay,
            warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule, max_steps=t.max_steps,
            micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
            max_grad_norm=t.max_grad_norm, optimizer=t.optimizer, eval_every=t.eval_every,
            data=self.data_spec(), inject_oom_at_step=t.inject_oom_at_step,
        )
