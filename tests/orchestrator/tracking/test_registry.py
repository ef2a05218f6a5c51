"""The best adapter registered as `models:/best@champion`, and loaded back on the right base."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_sweeps

from orchestrator.finish import best_row
from orchestrator.load import LoadError, base_spec, resolve
from orchestrator.tracking.keys import CHAMPION_ALIAS, DATA_TAG_PREFIX, REGISTERED_TAG

NAME = tiny_sweeps.REGISTERED
REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_the_best_trial_is_registered_with_its_lineage(optuna_run):
    run = optuna_run
    client = run.client
    best = best_row(run.summary["trials"])
    version = client.get_model_version_by_alias(NAME, CHAMPION_ALIAS)
    assert version.run_id == best["run_id"]
    assert version.source.endswith("/adapter")
    assert run.summary["search"]["registered"]["uri"] == f"models:/{NAME}@{CHAMPION_ALIAS}"
    assert run.parent.data.tags[REGISTERED_TAG] == f"models:/{NAME}/{version.version}"
    tags = version.tags
    child = client.get_run(best["run_id"])
    assert tags["qlora.base_model"] == "tiny"
    assert tags["qlora.quant_type"] == "nf4" and tags["qlora.quant_double_quant"] == "True"
    assert tags["qlora.quant_compute_dtype"] == "float32"
    assert tags["qlora.data_hash"] == child.data.tags[DATA_TAG_PREFIX + "data_hash"]
    assert tags["qlora.code_version"].startswith(("git:", "qlora-orchestrator=="))
    assert tags["qlora.trial_id"] == best["trial_id"]
    assert float(tags["qlora.eval_loss"]) == pytest.approx(best["eval_loss"], rel=1e-5)
    spec = base_spec({k[len("qlora."):]: v for k, v in tags.items()})
    assert (spec.name_or_path, spec.quant_type, spec.double_quant, spec.compute_dtype,
            spec.revision) == ("tiny", "nf4", True, "float32", None)


@pytest.mark.slow
def test_champion_loads_and_generates_with_the_best_adapter(optuna_run, tmp_path):
    """`models:/best@champion` -> a PeftModel whose weights are the best trial's and whose logits
    are the engine's for that adapter; it generates."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from orchestrator.load import generate, load_adapter
    from qlora import BaseSpec, TrialSpec, load_base
    from qlora.adapters import inject, load_adapter_state, remove
    from qlora.evaluate import adapter_logits
    from qlora.export import PEFT_PREFIX

    best = best_row(optuna_run.summary["trials"])
    loaded = load_adapter(f"models:/{NAME}@{CHAMPION_ALIAS}", optuna_run.config.tracking.uri,
                          device="cpu", dst=tmp_path / "download")
    assert loaded.run_id == best["run_id"]
    saved = load_file(str(Path(best["adapter_dir"]) / "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(loaded.model)
    assert saved.keys() == ours.keys() and saved
    for key, tensor in saved.items():
        torch.testing.assert_close(ours[key].float(), tensor.float())

    # The engine, on a base built from the same lineage, with the same weights: the same logits.
    engine = load_base(BaseSpec(name_or_path="tiny", compute_dtype="float32"), "cpu")
    trial = TrialSpec(trial_id="champion", r=best["lora_r"], alpha=best["lora_alpha"])
    inject(engine, "champion", trial)
    load_adapter_state(engine, "champion", {k[len(PEFT_PREFIX):]: v for k, v in saved.items()})
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = adapter_logits(engine, "champion", ids).float()
    remove(engine, "champion")
    with torch.no_grad():
        got = loaded.model(input_ids=ids).logits.float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4

    text = generate(loaded, "### Instruction:\nReverse the string.\n\n### Input:\nabc\n\n"
                            "### Response:\n", max_new_tokens=6)
    assert isinstance(text, str)
    out = loaded.model.generate(**loaded.tokenizer("abc", return_tensors="pt"), max_new_tokens=6,
                                do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    assert out.shape[1] > 3  # it generated new tokens


def test_references_are_checked():
    class NoClient:
        def get_run(self, run_id):
            raise AssertionError("not reached")

    for bad in ("models:/best", "not-a-run-id", "runs:/xyz/adapter"):
        with pytest.raises(LoadError):
            resolve(NoClient(), bad)


@pytest.mark.slow
def test_load_cli_prints_the_generated_text(optuna_run):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.load", f"models:/{NAME}@{CHAMPION_ALIAS}",
         "--tracking-uri", optuna_run.config.tracking.uri, "--instruction", "Reverse the string.",
         "--input", "abc", "--max-new-tokens", "4", "--min-new-tokens", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=180, cwd=optuna_run.root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{NAME} version 1" in done.stderr
    assert done.stdout.endswith("\n")  # the answer alone on stdout
    # Never a silent blank line: visible text, or a line saying the answer is blank and why.
    assert done.stdout.strip() or "# the answer is blank (" in done.stderr, done.stderr[-500:]


def test_load_cli_says_what_is_missing(optuna_run, capsys):
    from orchestrator.load import main

    assert main(["models:/nobody@champion", "--tracking-uri", optuna_run.config.tracking.uri,
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: models:/nobody@champion: ")


@pytest.mark.slow
def test_merged_export_of_the_champion_equals_its_peft_model(optuna_run, tmp_path):
    """`--merge` of `models:/NAME@champion`: a plain transformers folder (no PEFT, no
    bitsandbytes) whose fp32 logits equal the PeftModel's on the base it trained on (1e-4);
    without `--merge`, a PEFT folder naming a loadable base."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.export import BASE_FILE, main
    from orchestrator.load import load_adapter

    ref, uri = f"models:/{NAME}@{CHAMPION_ALIAS}", optuna_run.config.tracking.uri
    out = tmp_path / "merged"
    assert main([ref, str(out), "--merge", "--dtype", "float32", "--tracking-uri", uri]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and not list(out.glob("adapter_*"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = load_adapter(ref, uri, device="cpu")
    ids = loaded.tokenizer("### Instruction:\nSort the words.\n\n### Input:\nfig kiwi pear",
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4
    no_adapter = loaded.model.get_base_model()
    with torch.no_grad(), loaded.model.disable_adapter():
        assert (no_adapter(input_ids=ids).logits - got).abs().max().item() > 1e-3  # it merged

    folder = tmp_path / "adapter"
    assert main([ref, str(folder), "--tracking-uri", uri]) == 0
    named = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(named, "config.json").is_file()  # a base from_pretrained loads
    assert json.loads((folder / BASE_FILE).read_text())["quant_type"] == "nf4"
    assert main([ref, str(folder), "--tracking-uri", uri]) == 2  # not empty: refused


def test_export_of_nothing_is_one_error_line(tmp_path, capsys):
    from orchestrator.export import main

    assert main([str(tmp_path), str(tmp_path / "out"), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}: ") and "adapter_config.json" in line


def test_remote_code_runs_only_from_the_flag_never_from_a_tag(tmp_path, capsys):
    """A lineage (a model version's tags, an adapter folder's qlora_base.json) is data anyone who
    can write there sets: its trust_remote_code=true is reported, not followed."""
    import json

    from orchestrator.export import BASE_FILE, main

    lineage = {"base_model": "tiny", "base_trust_remote_code": "True"}
    with pytest.raises(LoadError, match="pass --trust-remote-code if you trust it"):
        base_spec(lineage)
    assert base_spec(lineage, trust_remote_code=True).trust_remote_code is True
    assert base_spec({"base_model": "tiny"}).trust_remote_code is False
    assert base_spec({"base_model": "tiny", "base_trust_remote_code": "False"},
                     trust_remote_code=True).trust_remote_code is True  # the user's flag rules
    folder = tmp_path / "adapter"  # an adapter folder someone else wrote
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / BASE_FILE).write_text(json.dumps(lineage))
    assert main([str(folder), str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {folder}: its base tiny is recorded with trust_remote_code=true")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2_135m", marks=pytest.mark.slow)])
@pytest.mark.parametrize("input_text", ["abc", ""])
def test_load_prompts_as_training_renders_the_row(model, input_text, tmp_path):
    """`--instruction X --input Y` gives the model, token for token, the prompt part of the alpaca
    row {X, Y} as the training data path tokenizes it: both models have a chat template, which
    training uses, and the tiny one's does not open with bos, which training adds."""
    import json

    from orchestrator.load import alpaca_prompt
    from qlora import BaseSpec, DataSpec
    from qlora.base import load_tokenizer
    from qlora.data import load_data, prompt_ids

    tok = load_tokenizer(BaseSpec(name_or_path=model))
    assert tok.chat_template
    row = {"instruction": "Reverse the string.", "input": input_text, "output": "cba"}
    (tmp_path / "row.jsonl").write_text(json.dumps(row) + "\n")
    [trained] = load_data(DataSpec(path=str(tmp_path / "row.jsonl"), eval_fraction=0.0), tok).train
    prompt = alpaca_prompt(tok, row["instruction"], row["input"])
    assert prompt_ids(prompt, tok) == trained.input_ids[:trained.prompt_len]


@pytest.mark.parametrize(("cli", "args"), [("load", ["--prompt", "x"]), ("export", ["out"])])
@pytest.mark.parametrize("store", [None, "sqlite:///elsewhere/m.db"])
def test_cli_on_a_missing_store_creates_none(cli, args, store, tmp_path, monkeypatch, capsys):
    """A tracking store that is not there holds no model: one error line naming it, and no empty
    store created in its place (the default is ./mlflow.db, wherever the command runs)."""
    import importlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    main = importlib.import_module(f"orchestrator.{cli}").main
    ref = f"models:/{NAME}@{CHAMPION_ALIAS}"
    uri = store or "sqlite:///mlflow.db"
    assert main([ref, *args, *(["--tracking-uri", store] if store else [])]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {ref}: no tracking store at {uri}"), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["elsewhere"]


def test_report_on_a_missing_store_creates_none(tmp_path, monkeypatch, capsys):
    from orchestrator.report import main

    monkeypatch.chdir(tmp_path)
    assert main(["--sweep", "any"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --tracking-uri: no tracking store at sqlite:///mlflow.db"), line
    assert list(tmp_path.iterdir()) == []
