"""Checks of the outside world before Ray or MLflow start: files, the model, services.

A sweep should fail in seconds, in one line, when a file is missing or a server is down, not
after Ray has started and the first worker has loaded a model. Each check raises `ConfigError`
naming the key whose value points at the problem; none of them creates a run or a cluster, the
only files they write are `cluster.storage`'s probe (deleted at once) and the data's records
under $QLORA_CACHE, and none imports Ray, MLflow or torch. `check_trials`, apart, needs the
model's tokenizer and skeleton: the CLI runs it while Ray starts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import Config
from orchestrator.search.params import normalize

MODEL_TIMEOUT_S = 5.0
SERVICE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE = ("1", "true", "yes", "on")


def preflight(cfg: Config) -> None:
    """The sweep's `params` normalized (`orchestrator.search.params`), then every check below,
    cheapest first; raises the first `ConfigError`."""
    normalize(cfg)
    check_cluster(cfg)
    check_tracking(cfg)
    check_storage(cfg)
    check_data(cfg)
    check_model(cfg)
    check_positions(cfg)
    check_resume(cfg)


def check_trials(cfg: Config) -> None:
    """What only the model can say of each trial (not part of `preflight`: it imports torch and
    datasets, so the CLI runs it while Ray starts in the background): its
    `lora.target_modules` select a linear of the model (its skeleton built on the meta device),
    and its data tokenizes with the model's tokenizer and keeps an example at its `seq_len` (the
    tokenized data is cached: the sweep then opens it)."""
    from orchestrator.cluster.datashare import check_targets, prepare
    from orchestrator.search.expand import expand

    if cfg.sweep.strategy not in ("grid", "random"):
        return  # a search proposes its trials as it goes: the sweep tokenizes them then
    trials = expand(cfg)
    check_targets(trials)
    prepare(trials)


def check_resume(cfg: Config) -> None:
    """`resume=PATH` names a trial checkpoint folder of one of the sweep's trials."""
    from orchestrator.search.resume_trial import resume_config

    resume_config(cfg)


def check_data(cfg: Config) -> None:
    """Every data file a trial will read exists and parses in its `data.format` (the bundled set is
    ours). A sweep may give trials their own `data.path`: each distinct file is checked once.
    With `data.skip_invalid=true`, how many rows will be skipped is said here, before training."""
    from orchestrator.search.expand import expand
    from qlora.config import DataSpec, mix_sources
    from qlora.data import DataError, validate_data_file

    seen: set[tuple] = set()
    for data in [cfg.data, *(t.config.data for t in expand(cfg))]:
        if data.eval_path is None and data.eval_fraction == 0:  # (a sweep may set it per trial)
            raise ConfigError("data.eval_fraction", "0 holds out no eval split, and a trial with "
                                                    "no eval example has no eval_loss to rank; "
                                                    "give a fraction in (0, 1) or data.eval_path")
        sources = [("data.path", data.path, data.format, data.name, data.split, data.revision,
                    data.eval_path is None),
                   ("data.eval_path", data.eval_path, data.format, data.name, data.split,
                    data.revision, False)]
        for m in mix_sources(data.mix) if data.mix else ():  # each holds out its own eval split
            sources.append(("data.mix", m.path, m.format or data.format, m.name, m.split,
                            m.revision, True))
        for key, path, fmt, name, split, revision, holds_eval in sources:
            what = (path, fmt, data.skip_invalid, name, split, revision)
            if path is None or what in seen:
                continue
            seen.add(what)
            try:
                info = validate_data_file(path, fmt, data.skip_invalid, spec=DataSpec(
                    name=name, split=split, revision=revision))
            except DataError as e:
                raise ConfigError(key, str(e)) from None
            except OSError as e:
                raise ConfigError(key, f"{path}: {e.strerror or e}") from None
            if info.get("skipped"):
                print(f"note: {key}: {path}: {info['skipped']} invalid rows will be skipped "
                      f"(data.skip_invalid=true), {info['rows']} kept", file=sys.stderr)
            if holds_eval and info["rows"] < 2:
                raise ConfigError(key, f"{path} has {info['rows']} row(s): too few to hold out an "
                                       "eval split (2 or more, or give data.eval_path)")


def check_positions(cfg: Config) -> None:
    """Every trial's `train.seq_len` fits the model's positions (`max_position_embeddings` of the
    tiny model's settings or of a model folder's config.json; a model not on disk yet is checked
    when it loads)."""
    from orchestrator.search.expand import expand

    name = cfg.model.name_or_path
    if name == "tiny":
        from qlora.tiny import TINY_CONFIG

        positions = TINY_CONFIG["max_position_embeddings"]
    else:
        config = Path(os.path.expanduser(name)) / "config.json"
        try:
            positions = json.loads(config.read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            return
    longest = max([cfg.train.seq_len, *(t.spec.data.seq_len for t in expand(cfg))])
    if isinstance(positions, int) and longest > positions:
        raise ConfigError("train.seq_len", f"{longest} is beyond the {positions} positions of "
                                           f"{name}; at most {positions}")


def check_model(cfg: Config) -> None:
    """`model.name_or_path` is `tiny`, a known model (fetched here, before anything starts, when
    it is not cached yet), a complete GGUF file or a folder holding one, a model folder, or a hub
    id that is cached or reachable."""
    from qlora.models import KNOWN, ModelError, check_gguf, fetch, gguf_file

    key, name = "model.name_or_path", cfg.model.name_or_path
    if name == "tiny":
        return
    try:
        if name in KNOWN:
            fetch(name)
            return
        gguf = gguf_file(name)
        if gguf is not None:
            check_gguf(gguf)
            return
    except ModelError as e:
        raise ConfigError(key, str(e)) from None
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(key, f"{name}: the folder has no config.json (not a saved model)")
        inits = [cfg.lora.init, *cfg.sweep.params.get("lora.init", [])]
        if "loftq" in inits and not any(path.glob("*.safetensors")):
            raise ConfigError("lora.init", f"loftq reads the base's full-precision weights from "
                                           f"its .safetensors files, and {name} holds none")
        return
    if path.exists():
        raise ConfigError(key, f"{name}: not a folder; give the folder holding config.json")
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise ConfigError(key, f"{name}: no such folder (and not a hub id such as org/name)")
    _check_hub(key, name, cfg.model.revision)


def check_tracking(cfg: Config) -> None:
    """The MLflow store can be used: a writable folder for SQLite, a live server for http(s)."""
    key, uri = "tracking.uri", cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        db = Path(os.path.expanduser(uri[len("sqlite:///"):]))
        if db.exists() and (db.is_dir() or not os.access(db, os.W_OK)):
            raise ConfigError(key, f"{db}: not a writable file")
        _check_writable_dir(key, db.parent)
        location = cfg.tracking.artifact_location
        if "://" not in location:
            _check_writable_dir("tracking.artifact_location", Path(os.path.expanduser(location)))
    elif uri.startswith(("http://", "https://")):
        _check_mlflow_server(key, uri.rstrip("/"))
    else:  # a database URL: its driver must be installed (no connection is tried here)
        _check_db_driver(key, uri)


def _check_db_driver(key: str, uri: str) -> None:
    """The SQLAlchemy dialect and DB-API driver of a database URL import."""
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as e:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(key, f"no driver for {scheme}:// is installed ({e}); install it "
                               "(postgresql: psycopg or psycopg2-binary, mysql: pymysql or mysqlclient, "
                               "mssql: pyodbc), or use sqlite:///PATH or an MLflow server") from None
    except Exception as e:  # a URL SQLAlchemy cannot read
        raise ConfigError(key, f"not a database URL SQLAlchemy can use: {type(e).__name__}") from None

def check_storage(cfg: Config) -> None:
    """`cluster.storage`: the folder or bucket takes a write (orchestrator.cluster.storage)."""
    from orchestrator.cluster import storage

    storage.check(cfg.cluster.storage)


def check_cluster(cfg: Config) -> None:
    """`cluster.address`: local needs nothing; HOST:PORT, ray://HOST:PORT and auto need a
    listening cluster."""
    key, address = "cluster.address", cfg.cluster.address
    if address == "local":
        return
    if address != "auto":  # ray://HOST:PORT (Ray Client) or HOST:PORT (the head's GCS)
        host, _, port = address.removeprefix("ray://").rpartition(":")
        reason = _tcp_error(host, int(port))
        if reason:
            raise ConfigError(key, f"cannot reach the Ray cluster at {address} ({reason}); "
                                   "is `ray start --head` running there?")
        return
    found = find_ray_cluster()
    if found is None:
        raise ConfigError(key, "auto: no running Ray cluster was found (RAY_ADDRESS is unset and "
                               f"{ray_address_file()} does not exist); start one with "
                               "`ray start --head`, or use cluster.address=local")
    host, _, port = found.removeprefix("ray://").rpartition(":")
    reason = _tcp_error(host, int(port)) if port.isdigit() else None
    if reason:
        raise ConfigError(key, f"auto: the Ray cluster at {found} does not answer ({reason}); "
                               "start one with `ray start --head`, or use cluster.address=local")


def find_ray_cluster() -> str | None:
    """The address `ray.init("auto")` would join: $RAY_ADDRESS, else the last `ray start`'s."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env
    try:
        text = Path(ray_address_file()).read_text().strip()
    except OSError:
        return None
    return text or None


def ray_address_file() -> str:
    """Where `ray start` records the cluster address (Ray's own lookup of its temp folder)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    if os.name == "nt":
        base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return os.path.join(base, "ray", "ray_current_cluster")


# --- helpers -----------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return True
    # `models/llama` where ./models exists is a folder the user meant, not an org on the hub
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).exists()


def _check_hub(key: str, repo: str, revision: str | None) -> None:
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    offline = any(os.environ.get(v, "").lower() in _TRUE
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline:
        raise ConfigError(key, f"{repo!r} is not a local folder and not in the Hugging Face cache, "
                               "and HF_HUB_OFFLINE is set; download it first or give a folder")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision or 'main', safe='')}/config.json"
    request = urllib.request.Request(url, method="HEAD")
    token = huggingface_hub.get_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=MODEL_TIMEOUT_S):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            login = "" if token else " and no token is set (`huggingface-cli login` or HF_TOKEN)"
            raise ConfigError(key, f"{repo!r} is gated or private on the hub{login}") from None
        if e.code == 404:
            raise ConfigError(key, f"{repo!r} is not a local folder and the hub has no such model "
                                   f"(or no revision {revision or 'main'!r})") from None
        raise ConfigError(key, f"{repo!r}: the hub answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(key, f"{repo!r} is not a local folder and the hub is unreachable "
                               f"({_reason(e)})") from None


def _check_writable_dir(key: str, folder: Path) -> None:
    """`folder` exists and is writable, or could be created: its nearest existing parent is."""
    probe = folder if str(folder) else Path(".")
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"{folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{folder}: {probe} is not writable")


def _check_mlflow_server(key: str, uri: str) -> None:
    # /health answers on every MLflow server; the search endpoint also behind a path prefix.
    tried = []
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(uri + path, timeout=SERVICE_TIMEOUT_S) as response:
                if path == "/health" or _is_json(response.read(65536)):
                    return
                tried.append(f"{path}: not an MLflow answer")
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return  # a server with auth: MLflow's client sends the credentials
            tried.append(f"{path}: HTTP {e.code}")
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(key, f"cannot reach the MLflow server at {uri} ({_reason(e)}); start "
                                   "one with `mlflow server --backend-store-uri sqlite:///mlflow.db "
                                   "--port 5000`, or use tracking.uri=sqlite:///mlflow.db") from None
    raise ConfigError(key, f"{uri} does not look like an MLflow server ({'; '.join(tried)})")


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _tcp_error(host: str, port: int) -> str | None:
    """None when `host:port` accepts a TCP connection within the timeout, else why not."""
    try:
        with socket.create_connection((host, port), timeout=SERVICE_TIMEOUT_S):
            return None
    except OSError as e:
        return _reason(e)


def _reason(e: BaseException) -> str:
    inner = getattr(e, "reason", None)
    if isinstance(inner, BaseException):
        e = inner
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    return getattr(e, "strerror", None) or str(inner or e) or type(e).__name__
