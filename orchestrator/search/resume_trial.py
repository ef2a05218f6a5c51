"""`resume=PATH`: continue one trial from its checkpoint folder.

PATH is a trial's folder as `qlora.checkpoint` writes it, `<checkpoint_dir>/<parent run id>/
<trial id>/`. The config given with it (the same overrides the sweep ran with) must hold that
trial: its id is the hash of its settings (`orchestrator.search.trials.trial_id`), so the match
says the settings are the ones it was trained with. The run is then a new sweep of that one trial,
under the same sweep name, which continues from the checkpoint and checkpoints into the same
folder; the folder is kept when it ends.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import Config


def resume_path(config: Config) -> Path | None:
    """The trial folder `resume=PATH` names (absolute), or None for resume=true/false."""
    if isinstance(config.resume, bool):
        return None
    return Path(config.resume).expanduser().resolve()


def resume_config(config: Config) -> Config:
    """The config that runs only the trial of `resume=PATH`, or `config` itself without a path.

    Raises `ConfigError("resume", ...)` for a folder that is not a trial checkpoint, or whose
    trial is not one of the sweep's trials (the settings differ from the ones it ran with).
    """
    from orchestrator.search.expand import expand
    from qlora.checkpoint import check_folder

    folder = resume_path(config)
    if folder is None:
        return config
    try:
        tid = check_folder(folder)
    except ValueError as e:
        raise ConfigError("resume", str(e)) from None
    if config.sweep.strategy == "optuna":
        raise ConfigError("resume", "a trial folder continues one trial of a grid or random "
                                    "sweep; an optuna sweep continues with resume=true")
    trials = expand(config)
    match = [t for t in trials if t.trial_id == tid]
    if not match:
        shown = ", ".join(t.trial_id for t in trials[:4]) + (", ..." if len(trials) > 4 else "")
        raise ConfigError("resume", f"{folder} holds trial {tid}, which is not a trial of this "
                                    f"config (its trials: {shown}); give the overrides it ran "
                                    "with")
    one = dataclasses.replace(config.sweep, strategy="grid", params={}, num_trials=None,
                              scheduler="none")
    return dataclasses.replace(match[0].config, sweep=one, resume=str(folder))
