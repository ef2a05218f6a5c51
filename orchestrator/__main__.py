"""`python -m orchestrator [key=value ...]`: compose, validate, check, then run the sweep.

A Hydra app: `--help`, `--cfg job`, `-m` and the other flags behave as Hydra's. Before Hydra
takes over, plain overrides are composed once here so that every mistake (an unknown sweep, an
unknown key, a bad value, a missing file, a server that is down) ends in one line on stderr,
`error: <key>: <what is wrong>`, and exit status 2, before Ray or MLflow start.

Exit status: 0 every trial finished, 1 a trial failed, 2 a bad config or an unreachable service,
3 the cluster or the tracking server went away mid-sweep, 130 interrupted by Ctrl-C (for 3 and
130 the command that resumes the sweep is printed).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from orchestrator.config.compose import (
    CONFIG_NAME,
    compose,
    config_dir,
    multirun_job,
    override_key,
)
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import Config


class _State:
    """What the pre-check already did, so Hydra's task does not do it twice."""

    checked = False
    codes: list[int] = []
    cluster = None  # the Ray start begun by the pre-check, for the first task to take


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI on `argv` (default `sys.argv[1:]`) and exit with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a.startswith("-") for a in args):  # Hydra's own flags: left to Hydra
        try:
            config = check(args)
        except ConfigError as e:
            _fail(e)
        _State.checked = True
        if config.dry_run:
            print(_dry_run(config))
            sys.exit(0)
        _State.cluster = _start_and_check_trials(config)
    _run_hydra(args)
    sys.exit(max(_State.codes, default=0))


def check(overrides: list[str]) -> Config:
    """The validated config of `overrides` after the preflight checks, or `ConfigError`."""
    from orchestrator.config.validate import validate
    from orchestrator.preflight import preflight

    config = validate(compose(overrides))
    preflight(config)
    return config


def _start_and_check_trials(config: Config):
    """Start Ray in the background, and meanwhile what needs the model: each trial's target
    modules, its data tokenized (`orchestrator.preflight.check_trials`). Returns the start."""
    from orchestrator.cluster.background import abandon, start_connect
    from orchestrator.preflight import check_trials
    from orchestrator.search.expand import first_workers

    cluster = start_connect(config.cluster, first_workers(config))
    try:
        check_trials(config)
    except BaseException as e:
        abandon(cluster)
        if isinstance(e, ConfigError):
            _fail(e)
        raise
    return cluster


def _run_hydra(args: list[str]) -> None:
    import hydra

    sys.argv = [sys.argv[0] if sys.argv else "orchestrator", *args]
    task = hydra.main(config_path=config_dir(), config_name=CONFIG_NAME, version_base="1.3")(_task)
    task()


def _task(cfg: Any) -> int:
    """One Hydra job: validate (cheap), check once, then run the sweep and record its status."""
    from hydra.core.hydra_config import HydraConfig

    from orchestrator.config.validate import check_overrides, validate
    from orchestrator.preflight import preflight

    try:
        config = validate(cfg)
        if not _State.checked:
            check_overrides(list(HydraConfig.get().overrides.task))  # a -m job's own
            preflight(config)
    except ConfigError as e:
        _fail(e)
    job_name = multirun_name(config.sweep.name)
    if job_name is not None:  # each job of -m is a sweep of its own, with its own name and folder
        config.sweep.name = job_name
    if config.dry_run:
        print(_dry_run(config))
        _State.codes.append(0)
        return 0
    if _State.cluster is not None:  # begun by the pre-check, with the trials checked
        cluster, _State.cluster = _State.cluster, None
    else:  # Ray starts now, in the background, while the trials are checked
        cluster = _start_and_check_trials(config)
    from orchestrator.sweep import run_sweep

    try:
        code = int(run_sweep(config, cluster))
    except ConfigError as e:  # a setup problem only the run could see (e.g. the store's schema)
        _fail(e)
    _State.codes.append(code)
    return code


#: Overrides that do not tell one -m job's sweep from another's (a sweep file names its own).
_NOT_IN_NAME = ("sweep", "sweep.name", "resume", "dry_run")


def multirun_name(name: str) -> str | None:
    """The sweep name of this Hydra `-m` job, `<name>-<its overrides>` (`single-lora.r=4`), or
    None outside `-m`. Two jobs of one `-m` never share a name, so they never share a parent run
    or a folder."""
    job = multirun_job()
    if job is None:
        return None
    num, overrides = job
    swept = _swept_keys(sys.argv[1:])
    own = [o for o in overrides if override_key(o) not in _NOT_IN_NAME and (not swept or override_key(o) in swept)]
    return f"{name}-{','.join(own)}" if own else (name if _only_sweeps(overrides) else
                                                  f"{name}-job{num}")


def _swept_keys(args: list[str]) -> set[str]:
    """The keys a `-m` command line sweeps (`lora.r=4,8`, `range(...)`, `choice(...)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(
            [a for a in args if not a.startswith("-")])
    except Exception:  # Hydra reports its own parse errors
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def _only_sweeps(overrides: list[str]) -> bool:
    return any(override_key(o) in ("sweep", "sweep.name") for o in overrides)


def _dry_run(config: Config) -> str:
    from orchestrator.search.expand import expand, format_trials, skipped

    trials = expand(config)
    note = "".join(f"left out of the sweep: {line}\n" for line in skipped(config))
    if config.sweep.strategy == "optuna":
        note += (f"optuna: the first round of a budget of {config.sweep.num_trials}; later rounds "
                "are proposed from the results\n")
    return (f"{format_trials(config, trials)}\n{note}"
            "dry run: nothing was started (drop dry_run=true to run the sweep)")


def _fail(e: ConfigError) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
