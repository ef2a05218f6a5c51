"""The typed configuration of a sweep: what `conf/` and `sweeps/` compose into.

One declaration per key: its type, default, allowed values and help text live on the field
(`setting(...)`, or `engine(...)` for a setting the engine owns, whose default and limits come
from `qlora.config`). `validate()` checks values against it and says it in `error:` lines;
`conf/config.yaml` and `--help` are written from it (`orchestrator.config.yaml_file`).
Inside the orchestrator and its Ray workers only these dataclasses travel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config.rules import (
    ADDRESS,
    MEMORY_SIZE,
    METRIC_PATH,
    MODEL_NAME,
    NAME,
    PBT_KEYS,
    RUNGS,
    TARGET_MODULES,
    Rule,
    at_least,
    nonempty,
)
from orchestrator.config.strategies import Registered
from qlora.config import (
    LIMITS,
    TINY,
    BaseSpec,
    DataSpec,
    TrialSpec,
    mix_sources,
    pattern_error,
)


def setting(default: Any, help: str, allowed: Rule | None = None, set_by: str = "") -> Any:
    """A config field: its default, a line of help, and what it accepts (None: any value of
    its type). `set_by` names the group file that sets it, which keeps it out of config.yaml
    (OmegaConf would not let a group's required `???` replace a value given there)."""
    meta = {"help": help, "rule": allowed, "set_by": set_by}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def engine(spec: type, name: str, help: str, note: str = "") -> Any:
    """A config field the engine owns: default from `spec`'s field `name`, limits from
    `qlora.config.LIMITS` (with `note` added to what an error says is allowed)."""
    [f] = [f for f in dataclasses.fields(spec) if f.name == name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    limit = LIMITS.get(name)
    rule = None
    if limit is not None:
        rule = Rule(limit.allowed + (f" ({note})" if note else ""), limit.ok)
    return setting(list(default) if isinstance(default, tuple) else default, help, rule)


def pattern(name: str, what: str) -> Any:
    """`lora.rank_pattern` / `lora.alpha_pattern`: module pattern -> value, checked by the
    engine's own rule (`qlora.config.pattern_error`)."""
    noun = {"rank_pattern": "an integer rank in 1..1024",
            "alpha_pattern": "a number alpha > 0"}[name]
    rule = Rule(f"a mapping of module names or regular expressions (matched as PEFT's {name}) "
                f"to {noun}", lambda v: pattern_error(name, v) is None)
    return setting({}, f"module -> {what}, PEFT's {name}: a key matches a module whose path "
                       "ends with it after a dot (a regular expression); the first key that "
                       f"matches wins; others keep lora.{what.split()[0]}", rule)


@dataclass
class ModelCfg:
    name_or_path: str = setting(TINY, '"tiny" (built locally, no download), smollm2_135m (fetched '
                                      "from PyPI), a local folder, a .gguf file or a hub id",
                                MODEL_NAME)
    revision: str | None = setting(None, "a hub branch, tag or commit; null = main",
                                   nonempty("a revision or null"))
    trust_remote_code: bool = setting(False, "run the model's own code from the hub")


@dataclass
class DataCfg:
    path: str | None = setting(None, "JSONL / JSON / CSV / Parquet file (local or an s3:// ... "
                                     "URI), a save_to_disk folder, a dataset repository folder or "
                                     "hub id (owner/name); null = the bundled dataset",
                               nonempty("a file, URI, folder or hub id, or null (the bundled "
                                        "dataset)"),
                               set_by="the data file: bundled.yaml (null) or custom.yaml (required)")
    mix: list[dict] | None = setting(
        None, "a mixture: a list of {path, weight} (also label, name, split, revision, format); "
              "rows drawn from each by weight, eval_loss_<label> per source; null = data.path",
        Rule("a list of 2 or more {path, weight} entries (weight > 0; also label, name, split, "
             "revision, format)", lambda v: v is None or isinstance(v, list)))
    name: str | None = setting(None, "a hub dataset's configuration (load_dataset's name)",
                               nonempty("a configuration name or null"))
    split: str = setting("train", "the split of a saved folder, repository or hub id",
                         nonempty("a split name, e.g. train"))
    revision: str | None = setting(None, "a hub dataset's branch, tag or commit; null = main",
                                   nonempty("a revision or null"))
    format: str = engine(DataSpec, "format", "how rows are read; auto detects it")
    eval_path: str | None = setting(None, "null = hold out eval_fraction of data.path",
                                    nonempty("a file path or null"))
    eval_fraction: float = engine(DataSpec, "eval_fraction",
                                  "deterministic split, the same for every trial")
    train_on_prompt: bool = engine(DataSpec, "train_on_prompt",
                                   "false = loss on the response tokens only")
    skip_invalid: bool = engine(DataSpec, "skip_invalid",
                                "true = drop malformed rows instead of stopping")
    packing: str = engine(DataSpec, "packing", "none | pack (several short examples per sequence)")
    max_eval_examples: int | None = engine(DataSpec, "max_eval_examples",
                                           "bounds the cost of each evaluation; null = the whole "
                                           "eval split")


@dataclass
class QuantCfg:
    type: str = engine(BaseSpec, "quant_type", "nf4 | fp4 | int8 | none (16-bit LoRA baseline)")
    double_quant: bool = engine(BaseSpec, "double_quant",
                                "also quantize the block constants (~0.37 bit/weight saved)")
    compute_dtype: str = engine(BaseSpec, "compute_dtype", "bfloat16 | float16 | float32")


@dataclass
class LoraCfg:
    r: int = engine(TrialSpec, "r", "rank of each adapter")
    alpha: float = engine(TrialSpec, "alpha",
                          "usually 2 x rank; the low-rank path is scaled by alpha / r")
    dropout: float = engine(TrialSpec, "dropout", "on the adapter's input")
    target_modules: list[str] | str = setting("all-linear", "or a list such as [q_proj, v_proj]",
                                              TARGET_MODULES)
    use_rslora: bool = engine(TrialSpec, "use_rslora", "rsLoRA: scale by alpha / sqrt(r) instead "
                                                       "of alpha / r (PEFT's use_rslora)")
    rank_pattern: dict = pattern("rank_pattern", "r per module, e.g. {q_proj: 8}")
    alpha_pattern: dict = pattern("alpha_pattern", "alpha per module, e.g. {'layers\\.0\\.': 8}")
    init: str = engine(TrialSpec, "init", "gaussian (PEFT's default: B = 0) | loftq (A, B from "
                                          "the SVD of the base's quantization error; nf4, fp4 "
                                          "or int8 bases)")
    loftq_iter: int = engine(TrialSpec, "loftq_iter", "LoftQ's alternating steps: on the pack's "
                                                      "one shared base the first is the optimum",
                             note="more would requantize the shared base per trial")


@dataclass
class TrainCfg:
    learning_rate: float = engine(TrialSpec, "learning_rate",
                                  "QLoRA's default for 7B-13B models")
    max_steps: int = engine(TrialSpec, "max_steps", "optimizer steps per trial; ignored when "
                                                    "num_epochs is set")
    num_epochs: float | None = engine(
        TrialSpec, "num_epochs", "passes over the train split instead of max_steps: steps = "
        "ceil(num_epochs x train rows / (micro_batch_size x grad_accum_steps)), logged as "
        "train_max_steps; giving max_steps too is an error", note="null = max_steps decides")
    micro_batch_size: int = engine(TrialSpec, "micro_batch_size",
                                   "sequences per adapter per forward pass")
    grad_accum_steps: int = engine(TrialSpec, "grad_accum_steps",
                                   "effective batch = micro_batch_size x grad_accum_steps")
    seq_len: int = engine(DataSpec, "seq_len", "tokens per sequence, longer examples are truncated")
    optimizer: str = engine(TrialSpec, "optimizer",
                            "paged_adamw_32bit | paged_adamw_8bit | adamw")
    weight_decay: float = engine(TrialSpec, "weight_decay", "AdamW's decoupled weight decay")
    warmup_steps: int = engine(TrialSpec, "warmup_steps", "linear warmup before lr_schedule; "
                                                          "ignored when warmup_ratio > 0")
    warmup_ratio: float = engine(
        TrialSpec, "warmup_ratio", "warmup as a fraction of the steps: ceil(warmup_ratio x "
        "max_steps), logged as train_warmup_steps; giving warmup_steps too is an error",
        note="0 = warmup_steps decides")
    lr_schedule: str = engine(TrialSpec, "lr_schedule",
                              "cosine | linear | constant, down to 0 at max_steps")
    max_grad_norm: float = engine(TrialSpec, "max_grad_norm", "per adapter; 0 disables clipping",
                                  note="0 disables clipping")
    eval_every: int = engine(TrialSpec, "eval_every",
                             "steps between evaluations; 0 = only at the end",
                             note="0 = only at the end")
    gradient_checkpointing: bool = engine(BaseSpec, "gradient_checkpointing",
                                          "recompute activations: less memory, ~30% more compute")
    activation_offload: bool = engine(BaseSpec, "activation_offload",
                                      "keep saved activations in CPU memory (long sequences)")
    checkpoint_every: int = setting(20, "steps between a trial's checkpoints (one is always "
                                        "written at its end); 0 = only at the end",
                                    at_least(0, "an integer", "0 = only when a trial ends"))
    inject_oom_at_step: int | None = engine(
        TrialSpec, "inject_oom_at_step", "testing only: fake a CUDA out-of-memory at this step in "
        "packs of 2+ (never part of a trial's id)", note="testing only")


@dataclass
class EvalCfg:
    """Generated answers at each evaluation (see qlora/generate.py and qlora/metrics.py)."""

    num_samples: int = setting(32, "eval prompts each trial answers greedily at each evaluation "
                                   "(the first of the eval split, the same for every trial); "
                                   "0 = none", at_least(0, "an integer", "0 = no generated answers"))
    max_new_tokens: int = setting(16, "longest answer in tokens; the tokenizer's eos ends one "
                                      "sooner", Rule("an integer in 1..4096",
                                                     lambda v: 1 <= v <= 4096))
    metric: str | None = setting(None, "package.module:function(prediction, reference) -> "
                                       "float, logged as eval_<function>", METRIC_PATH)


@dataclass
class PackCfg:
    max_adapters: int = setting(4, "trials sharing one frozen base on one worker; 1 = one run "
                                   "per worker", Rule("an integer in 1..64", lambda v: 1 <= v <= 64))
    memory_budget: str | None = setting(
        None, "per worker, e.g. 2GiB: packs are cut so that qlora.estimate_memory fits it "
              "(null: a GPU worker's free memory; on a CPU no cut)", MEMORY_SIZE)


@dataclass
class ClusterCfg:
    address: str = setting("local", "local (start Ray here) | auto (join the cluster of "
                                    "RAY_ADDRESS or the last `ray start`) | HOST:PORT | "
                                    "ray://HOST:PORT", ADDRESS)
    num_workers: int | None = setting(None, "null = one per GPU, or one per CPU core without GPUs",
                                      at_least(1, "an integer", optional=True))
    gpus_per_worker: float | None = setting(None, "null = 1 where the cluster has GPUs, else 0",
                                            at_least(0, "a number", optional=True))
    max_retries: int = setting(2, "restarts of a trial from its checkpoint after its worker or "
                                  "node is lost", at_least(0, "an integer"))
    checkpoint_dir: str | None = setting(
        None, "null = <output_dir>/<sweep name>/checkpoints; on a cluster, a path every node "
              "shares", nonempty("a folder path (shared by every node on a cluster) or null "
                                 "(<output_dir>/<sweep>/checkpoints)"))
    storage: str | None = setting(
        None, "where checkpoints and a copy of each adapter go: null = cluster.checkpoint_dir; a "
              "folder; or a URI (s3://bucket/prefix, gs://..., anything fsspec serves) for nodes "
              "with no shared disk; endpoint and credentials from the environment "
              "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or ~/.aws/",
        nonempty("a folder, a URI such as s3://bucket/prefix, or null"))
    lost_timeout_s: float = setting(
        120.0, "seconds with packs waiting and no worker placed (the cluster died, its address "
               "stopped answering) before the sweep stops: runs KILLED, exit 3, resumable",
        Rule("a number of seconds > 0", lambda v: v > 0))
    hang_timeout_s: float | None = setting(
        1800.0, "seconds a pack may report nothing (no step, no evaluation; its base's load "
                "counts) before its worker is taken as hung: killed, its trials sent again from "
                "their checkpoints (cluster.max_retries); null = never",
        Rule("a number of seconds > 0, or null", lambda v: v is None or v > 0))


@dataclass
class TrackingCfg:
    uri: str = setting("sqlite:///mlflow.db", "or http(s)://host:port of an MLflow server; file "
                                              "stores are refused by MLflow 3")
    experiment: str = setting("qlora-sweeps", "the MLflow experiment", nonempty())
    lost_timeout_s: float = setting(
        120.0, "seconds a tracking server may not answer (calls are retried, training goes on) "
               "before the sweep stops: exit 3, resumable", Rule("a number of seconds > 0",
                                                                lambda v: v > 0))
    artifact_location: str = setting("mlartifacts", "for a new experiment on a local store",
                                     nonempty())
    register_as: str | None = setting(
        None, "a name: the best trial's adapter goes to the Model Registry as "
              "models:/NAME@champion", Rule("a model name of letters, digits, '_', '-' and '.', "
                                            "or null", lambda v: v is None or bool(NAME.match(v))))


@dataclass
class AshaCfg:
    """Successive halving's rungs (see orchestrator/search/asha.py)."""

    rungs: list[float] = setting([0.25, 0.5], "fractions of train.max_steps where trials are "
                                              "compared (the last rung is the end)", RUNGS)
    eta: float = setting(3.0, "past rung k, only the best 1/eta^k of the sweep's trials go on",
                         Rule("a number > 1 (past each rung the best 1/eta continue)",
                              lambda v: v > 1))


@dataclass
class PbtCfg:
    """Population-based training (see orchestrator/search/pbt.py)."""

    interval: int = setting(10, "steps between exploits (each trial is evaluated then)",
                            at_least(1, "an integer"))
    quantile: float = setting(0.25, "the bottom and top fraction of a pack's trials: each of the "
                                    "bottom takes the state of one of the top",
                              Rule("a number in (0, 0.5]", lambda v: 0 < v <= 0.5))
    mutations: dict = setting({"train.learning_rate": "perturb"},
                              "key -> perturb (x0.8 or x1.2) or resample (from sweep.params); "
                              "keys: " + ", ".join(PBT_KEYS),
                              Rule("a mapping of " + " / ".join(PBT_KEYS) + " to perturb or "
                                   "resample", lambda v: bool(v) and all(
                                       k in PBT_KEYS and m in ("perturb", "resample")
                                       for k, m in v.items())))


@dataclass
class OptunaCfg:
    """Model-based search (see orchestrator/search/optuna_rounds.py)."""

    startup_trials: int = setting(8, "random proposals before TPE models the results",
                                  at_least(0, "an integer"))
    batch_size: int | None = setting(None, "proposals per round, each round from all earlier "
                                           "results; null = every adapter slot",
                                     at_least(1, "an integer", "every adapter slot", True))


@dataclass
class SweepDef:
    """A sweep from `sweeps/`: how to turn the base config into trials."""

    name: str = setting("single", "the parent run's name and the folder of its outputs",
                        Rule("a name of letters, digits, '_', '-' and '.'",
                             lambda v: bool(NAME.match(v))))
    strategy: str = setting("grid", "grid | random | optuna (TPE, proposals from the results so "
                                    "far)", Registered("strategy"))
    params: dict = setting({}, "dotted trial key -> values (grid, random, optuna) or {low, high, "
                               "log, type} (random, optuna)")
    num_trials: int | None = setting(None, "random: how many trials to draw; optuna: the budget "
                                           "of trials", at_least(1, "an integer", optional=True))
    scheduler: str = setting("none", "none | asha: stop the worse trials at rungs and backfill "
                                     "their slots (any strategy) | pbt: population-based "
                                     "training, the worse trials of a pack take the better ones' "
                                     "state and perturbed hyperparameters", Registered("scheduler"))
    asha: AshaCfg = field(default_factory=AshaCfg)
    pbt: PbtCfg = field(default_factory=PbtCfg)
    optuna: OptunaCfg = field(default_factory=OptunaCfg)
    objective: str = setting("eval_loss", "what the leaderboard, ASHA, Optuna and the champion "
                                          "optimise: eval_loss, eval_exact_match, eval_token_f1, "
                                          "eval_<metric>")
    mode: str = setting("min", "min | max (eval_exact_match and eval_token_f1: max)",
                        Rule("min or max", lambda v: v in ("min", "max")))


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    quant: QuantCfg = field(default_factory=QuantCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    pack: PackCfg = field(default_factory=PackCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    sweep: SweepDef = field(default_factory=SweepDef)
    seed: int = setting(0, "each trial's init and data order derive from it and the trial's own "
                           "config", at_least(0, "an integer"))
    resume: bool | str = setting(
        False, "true: continue the latest unfinished sweep of the same name; PATH: continue the "
               "trial whose checkpoint folder it is (<checkpoint_dir>/<parent run id>/<trial id>, "
               "with the overrides it ran with)",
        Rule("true, false or a trial checkpoint folder", lambda v: isinstance(v, bool)
             or bool(str(v).strip())))
    output_dir: str = setting("outputs", "checkpoints and run folders, relative to where you run",
                              nonempty("a folder path"))
    dry_run: bool = setting(False, "true: print the sweep's trials and exit without starting Ray "
                                   "or MLflow")

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
            path=d.path, name=d.name, split=d.split, revision=d.revision, format=d.format,
            mix=mix_sources(d.mix) if d.mix else (),
            eval_path=d.eval_path, eval_fraction=d.eval_fraction,
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
            use_rslora=lo.use_rslora, rank_pattern=lo.rank_pattern, alpha_pattern=lo.alpha_pattern,
            init=lo.init, loftq_iter=lo.loftq_iter,
            learning_rate=t.learning_rate, weight_decay=t.weight_decay,
            warmup_steps=0 if t.warmup_ratio else t.warmup_steps, warmup_ratio=t.warmup_ratio,
            lr_schedule=t.lr_schedule, max_steps=t.max_steps, num_epochs=t.num_epochs,
            micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
            max_grad_norm=t.max_grad_norm, optimizer=t.optimizer, eval_every=t.eval_every,
            data=self.data_spec(), inject_oom_at_step=t.inject_oom_at_step,
            eval_samples=self.eval.num_samples, eval_max_new_tokens=self.eval.max_new_tokens,
            eval_metric=self.eval.metric,
        )
