"""`conf/config.yaml`, written from the schema: every key with its default and its help line.

The schema (`orchestrator.config.schema`) is the one declaration of each key; this file is its
rendering for Hydra and for people, so the two cannot drift (a test compares them). After a
change to the schema:

    python -m orchestrator.config.yaml_file          # rewrite conf/config.yaml
    python -m orchestrator.config.yaml_file --check  # exit 1 if it is stale

`--help` lists the same keys with what each accepts (Hydra's help template, written here too).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.compose import CONFIG_NAME, config_dir
from orchestrator.config.schema import Config

HEADER = """\
# python -m orchestrator sweep=rank_grid          (any key below: key=value; `--cfg job` prints the result)
# The defaults: the tiny model built locally, the bundled dataset, one local Ray instance,
# MLflow in ./mlflow.db. Written from orchestrator/config/schema.py, where each key is declared
# once: edit the schema, then run `python -m orchestrator.config.yaml_file`.
defaults:
  - _self_  # first, so the chosen model/data/sweep files override the values below
  - model: tiny  # tiny | smollm2_135m | llama3_8b | mistral_7b, or model.name_or_path=FOLDER_OR_HUB_ID_OR_FILE.gguf
  - data: bundled  # bundled | custom, or data.path=FILE
  - sweep: single  # a file in sweeps/: rank_grid, alpha_grid, lr_grid, grid, random, asha, optuna, quant_grid, single
"""

HYDRA = """\
hydra:
  job:
    name: orchestrator
    chdir: false  # stay where the user ran, so ./mlflow.db and outputs/ land there
  run:
    dir: ${output_dir}/.hydra/${now:%Y-%m-%d_%H-%M-%S}  # Hydra's own log and config snapshot
  output_subdir: .  # the snapshot beside the log, not in one more .hydra/ folder
  sweep:
    dir: ${output_dir}/.hydra/multirun/${now:%Y-%m-%d_%H-%M-%S}
    subdir: ${hydra.job.num}
  help:
    app_name: qlora-orchestrator
    header: |
      ${hydra.help.app_name}: sweeps of LoRA adapters trained together on one frozen NF4 base,
      scheduled by Ray and tracked in MLflow.

      Usage: python -m orchestrator [key=value ...]    e.g. sweep=rank_grid lora.alpha=16 dry_run=true
    footer: |
      Exit status: 0 every trial finished, 1 a trial failed, 2 a bad config or an unreachable service.
      Hydra's own flags: --cfg job, -m, --info (see --hydra-help).
    template: |
      ${hydra.help.header}
      == Config groups ==
      $APP_CONFIG_GROUPS
      == Keys (key=value; default, then what is allowed) ==
"""


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render() -> str:
    """The text of conf/config.yaml: sections in the schema's order, then the top-level keys."""
    body: list[str] = []
    keys: list[str] = []

    def key_line(key: str, f: dataclasses.Field, default: Any, indent: str) -> None:
        help_text, rule = f.metadata.get("help", ""), f.metadata.get("rule")
        if f.metadata.get("set_by"):
            body[-1] += f"  # {key} is set by {f.metadata['set_by']}"
        else:
            body.append(f"{indent}{f.name}: {_scalar(default)}  # {help_text}")
        allowed = f"; {rule.allowed}" if rule is not None else ""
        keys.append(f"      {key}  ({_scalar(default)}{allowed})\n        {help_text}")

    def section(cls: type, prefix: str, indent: str) -> None:
        for f in dataclasses.fields(cls):
            default = _default(f)
            if dataclasses.is_dataclass(default):
                body.append(f"{indent}{f.name}:")
                section(type(default), f"{prefix}{f.name}.", indent + "  ")
            else:
                key_line(prefix + f.name, f, default, indent)

    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(_default(f))]
    for f in dataclasses.fields(Config):
        if f not in top:
            body += ["", f"{f.name}:"]
            section(type(_default(f)), f.name + ".", "  ")
    body.append("")
    for f in top:
        key_line(f.name, f, _default(f), "")
    template = HYDRA + "\n".join(keys) + "\n\n      ${hydra.help.footer}\n"
    return HEADER + "\n".join(body) + "\n\n" + template


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def path() -> Path:
    return Path(config_dir()) / f"{CONFIG_NAME}.yaml"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if path().read_text() != text:
            print(f"{path()} is stale: run python -m orchestrator.config.yaml_file", file=sys.stderr)
            return 1
        return 0
    path().write_text(text)
    print(f"wrote {path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
