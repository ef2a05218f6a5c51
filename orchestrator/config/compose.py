"""Where the shipped YAML lives, in a checkout and in an installed wheel.

A checkout has `<repo>/conf/` whose `sweep` entry is a symlink to `<repo>/sweeps/`, so that Hydra
sees the sweep files as the config group `sweep`. The wheel carries the same tree as
`orchestrator/conf/` (pyproject's force-include), with the sweeps as `orchestrator/conf/sweep/`.

`compose(overrides)` is the one composition of those files outside `@hydra.main` (the CLI's
pre-check and the tests), turning every Hydra error into a one-line `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parents[1]  # orchestrator/
CONFIG_NAME = "config"
GROUPS = ("model", "data", "sweep")
_NOUNS = {"model": "model", "data": "dataset", "sweep": "sweep"}
_HINTS = {
    "model": " (or model.name_or_path=FOLDER_OR_HUB_ID_OR_FILE.gguf)",
    "data": " (or data.path=FILE for your own file)",
}


def config_dir() -> str:
    """The absolute path of the folder holding `config.yaml` and the groups model/, data/, sweep/.

    An installed wheel's copy (inside the package) wins over a checkout's; an editable install
    has none inside the package and so uses the checkout.
    """
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no {CONFIG_NAME}.yaml in {_PACKAGE / 'conf'} or {_PACKAGE.parent / 'conf'}: "
        "the package was installed without its configs"
    )


def options(group: str) -> list[str]:
    """The option names of a config group (`sweep` -> ['alpha_grid', 'grid', ...]), sorted."""
    folder = Path(config_dir()) / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))


def compose(overrides: list[str]) -> Any:
    """Hydra's composition of the shipped configs and `overrides`; its errors as `ConfigError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from orchestrator.config.validate import check_overrides

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            composed = hydra_compose(config_name=CONFIG_NAME, overrides=overrides)
    except Exception as e:  # any composition failure comes from the user's input
        raise _translate(e, overrides) from None
    check_overrides(overrides)  # what only the overrides tell: keys the user gave both of
    return composed


def _translate(e: Exception, overrides: list[str]) -> ConfigError:
    """One `ConfigError` naming the key for whatever Hydra or OmegaConf raised while composing."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config.coerce import unknown_key

    if isinstance(e, ConfigError):
        return e
    if isinstance(e, MissingConfigException) and "/" in (e.missing_cfg_file or ""):
        group, _, option = e.missing_cfg_file.rpartition("/")
        known = list(e.options or options(group))
        noun = _NOUNS.get(group, f"{group} option")
        return ConfigError(group, f"unknown {noun} {option!r}; available: "
                                  f"{', '.join(known) or '(none)'}{_HINTS.get(group, '')}")
    if isinstance(e, OverrideParseException):
        override = e.override or ""
        key = override_key(override) or "override"
        if "=" not in override:
            return ConfigError(key, f"cannot parse {override!r}: not key=value; write e.g. "
                                    "lora.r=8, or sweep=rank_grid to choose a sweep")
        detail = (e.message or str(e)).splitlines()
        skip = ("See ", "Error parsing override")
        reason = next((line for line in detail if not line.startswith(skip)), "")
        return ConfigError(key, f"cannot parse {override!r}: {reason}; write key=value, "
                                "quoting lists and dicts: 'lora.r=[4,8]'")
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
    if isinstance(e, OmegaConfBaseException):
        cause = e
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        if full_key.startswith("sweep.params."):
            key = _key_in(str(e), overrides) or full_key
            param = (key if key.startswith("sweep.params.") else full_key)[len("sweep.params."):]
            return ConfigError(key, f"not a param of this sweep; add or change one with "
                                    f"'++sweep.params={{{param}: [v1, v2]}}'")
        for mapping in ("lora.rank_pattern", "lora.alpha_pattern"):
            if full_key.startswith(mapping + "."):
                return ConfigError(mapping, f"a new key of a mapping needs '++': write "
                                            f"'++{mapping}={{q_proj: 8}}' (quoted, the whole "
                                            f"mapping) or +{full_key}=VALUE")
        try:
            return unknown_key(full_key)
        except ConfigError as inner:
            return inner
    lines = [line for line in str(e).splitlines() if line.strip()]
    key = full_key or _key_in(lines[0] if lines else "", overrides) or "config"
    return ConfigError(key, lines[0] if lines else type(e).__name__)


def override_key(override: str) -> str:
    """The dotted key of a command-line override (`++lora.r=8` -> `lora.r`)."""
    return override.split("=", 1)[0].lstrip("+~").strip() if "=" in override else override.strip()


def _key_in(message: str, overrides: list[str]) -> str | None:
    """The key of the override a Hydra message quotes, if it quotes one."""
    for override in overrides:
        key = override_key(override)
        if key and f"'{key}'" in message:
            return key
    return None


def multirun_job() -> tuple[int, list[str]] | None:
    """(job number, its overrides) when this runs as one job of a Hydra `-m`, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # not under Hydra
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return int(hc.job.num), list(hc.overrides.task)
