"""Every shipped YAML composes and validates; the defaults are what the docs say; both layouts load."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from orchestrator.config.compose import compose, config_dir, options
from orchestrator.config.schema import Config
from orchestrator.config.validate import validate

REPO = Path(__file__).resolve().parents[3]
GROUP_FILES = sorted(
    [p for group in ("model", "data") for p in (REPO / "conf" / group).glob("*.yaml")]
    + list((REPO / "sweeps").glob("*.yaml")),
)
ALL_YAML = [REPO / "conf" / "config.yaml", *GROUP_FILES]
#: What a group option needs besides itself to validate.
EXTRA = {"data/custom": ["data.path=my_data.jsonl"]}


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _cli(args: list[str], cwd: Path, pythonpath: str = str(REPO)) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", GROUP_FILES, ids=_id)
def test_every_group_option_composes_and_validates(path):
    group = "sweep" if path.parent.name == "sweeps" else path.parent.name
    config = validate(compose([f"{group}={path.stem}", *EXTRA.get(f"{group}/{path.stem}", [])]))
    # What the file sets is what the config holds (no key silently dropped or renamed).
    for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(path))).items():
        if key.startswith("defaults") or value == "???":  # ??? : required, set by EXTRA
            continue
        where = key if group != "sweep" and group != "data" else f"{group}.{key}"
        got = _get(config, where)
        if where == "sweep.params":  # normalized: dotted keys -> lists or ranges
            continue
        assert got == value or (isinstance(got, float) and math.isclose(got, value)), (where, got)
    if group == "sweep":
        assert config.sweep.name == path.stem  # resume finds a sweep by this name


@pytest.mark.parametrize("path", ALL_YAML, ids=_id)
def test_every_yaml_opens_with_its_command(path):
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
    assert lines[0].startswith("# python -m orchestrator"), lines[0]


def test_sweep_group_lists_the_promised_sweeps():
    assert {"rank_grid", "alpha_grid", "lr_grid", "grid", "random", "single",
            "quant_grid"} <= set(options("sweep"))
    assert (REPO / "conf" / "sweep").resolve() == (REPO / "sweeps").resolve()


def test_tiny_defaults_are_what_the_docs_say():
    config = validate(compose([]))
    assert config.model.name_or_path == "tiny"
    assert config.quant == dataclasses.replace(Config().quant, compute_dtype="float32")
    assert (config.train.max_steps, config.train.seq_len, config.train.micro_batch_size,
            config.train.eval_every) == (60, 128, 4, 20)
    assert config.data.path is None  # the bundled dataset
    assert config.tracking.uri == "sqlite:///mlflow.db"
    assert config.tracking.experiment == "qlora-sweeps"
    assert config.cluster.address == "local"
    assert config.train.optimizer == "paged_adamw_32bit"
    assert (config.lora.r, config.lora.alpha, config.seed) == (16, 32.0, 0)
    assert config.sweep.name == "single" and config.sweep.params == {}
    assert not config.resume and not config.dry_run


def test_config_yaml_matches_the_schema_defaults():
    """conf/config.yaml and schema.py say the same thing, and every key can be overridden."""
    own = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    defaults = dataclasses.asdict(Config())
    for section, values in defaults.items():
        assert section in own, section
        if isinstance(values, dict) and section != "sweep":
            for key, value in values.items():
                if (section, key) == ("data", "path"):
                    continue  # set by the data group (null or required)
                assert own[section][key] == value, f"{section}.{key}"
        elif section != "sweep":
            assert own[section] == values, section
    composed = compose([])
    for section, values in defaults.items():
        if isinstance(values, dict) and section != "sweep":
            assert set(composed[section]) == set(values), section


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = _cli(["--cfg", "job", "sweep=rank_grid", "lora.alpha=8"], tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["lora"]["alpha"] == 8 and printed["sweep"]["name"] == "rank_grid"
    assert printed["sweep"]["params"] == {"lora.r": [4, 8, 16, 32]}


def test_dry_run_lists_the_trials_and_starts_nothing(tmp_path):
    result = _cli(["sweep=rank_grid", "dry_run=true"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("r4-a32-lr2e-3", "r8-a32-lr2e-3", "r16-a32-lr2e-3", "r32-a32-lr2e-3"):
        assert name in result.stdout
    assert sorted(os.listdir(tmp_path)) == []  # no mlflow.db, no outputs/


def test_dry_run_prints_the_steps_the_trials_train():
    """With `train.num_epochs`, the steps come from the train split's rows, as the engine counts
    them (`TrialSpec.resolved` on the tokenized data), not from `train.max_steps`."""
    from orchestrator.__main__ import _dry_run
    from qlora.base import load_tokenizer
    from qlora.data import load_data

    config = validate(compose(["train.num_epochs=1"]))
    spec = config.trial_spec("", "", 0)
    train_rows = len(load_data(spec.data, load_tokenizer(config.base_spec())).train)
    steps = spec.resolved(train_rows).max_steps
    assert steps != config.train.max_steps
    assert f", {steps} steps, " in _dry_run(config).splitlines()[0]


def test_multirun_runs_one_sweep_per_job_and_still_validates(tmp_path):
    result = _cli(["-m", "sweep=rank_grid,alpha_grid", "dry_run=true"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sweep rank_grid (grid): 4 trials" in result.stdout
    assert "sweep alpha_grid (grid): 4 trials" in result.stdout
    bad = _cli(["-m", "lora.r=0,8", "dry_run=true"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: lora.r: must be an integer in 1..1024, got 0"


def test_checkout_layout_uses_the_repo_conf():
    assert Path(config_dir()) == REPO / "conf"


def test_installed_layout_finds_configs_inside_the_package(tmp_path):
    """A wheel carries conf/ (sweep/ followed through the symlink) as orchestrator/conf/."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "orchestrator", site / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", site / "orchestrator" / "conf", symlinks=False)
    assert not (site / "orchestrator" / "conf" / "sweep").is_symlink()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pythonpath = os.pathsep.join([str(site), str(REPO)])  # qlora still from the checkout
    result = _cli(["sweep=grid", "dry_run=true"], run_dir, pythonpath)
    assert result.returncode == 0, result.stderr
    assert "12 trials" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "from orchestrator.config.compose import config_dir; print(config_dir())"],
        cwd=run_dir, env=dict(os.environ, PYTHONPATH=pythonpath), capture_output=True, text=True,
    )
    assert probe.stdout.strip() == str(site / "orchestrator" / "conf")


def _leaves(tree, prefix: str = "") -> dict:
    """A YAML mapping's leaves by dotted key (`# @package _global_` files: from the root)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("params", "mutations"):  # mappings as values
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_config_yaml_is_written_from_the_schema():
    from orchestrator.config.yaml_file import path, render

    assert path().read_text() == render(), "run: python -m orchestrator.config.yaml_file"


def test_help_lists_every_key_with_its_default_and_what_it_allows(tmp_path):
    import dataclasses

    from orchestrator.config.coerce import rule_of

    out = _cli(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    keys = []

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                keys.append((prefix + f.name, f.metadata["help"]))
    walk(Config)
    assert len(keys) > 50
    for key, help_text in keys:
        rule = rule_of(key)
        assert f"\n{key}  (" in out.stdout, key
        assert help_text in out.stdout, key
        if rule is not None:
            assert rule.allowed in out.stdout, key
    assert "lora.r  (16; an integer in 1..1024)" in out.stdout
