"""`cluster.storage`: where a sweep's checkpoints (and a copy of each adapter) live.

null keeps today's layout: checkpoints under `cluster.checkpoint_dir` (a folder every node
shares) or `<output_dir>/<sweep>/checkpoints`. A folder puts them under `<folder>/checkpoints/`.
A URI (`s3://bucket/prefix`, `gs://bucket/prefix`, anything fsspec serves) suits clusters with
no shared disk (KubeRay, `ray up`): every worker reads and writes its trials' checkpoints there
(`qlora.checkpoint`, from memory: nothing touches the node's disk), so a pack retried on another
node continues where it was, and each trial's adapter is copied to `<storage>/adapters/` on its
way to the tracker.

Endpoint and credentials are never part of the config: they come from the usual environment
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`;
`GOOGLE_APPLICATION_CREDENTIALS`) or the library's config files (~/.aws/), on the driver and on
every node, so nothing secret is logged, printed or stored in MLflow. `check` (preflight) writes,
reads and deletes one small object before any training, so a wrong bucket, endpoint or key is an
`error: cluster.storage: ...` line (exit 2).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import is_uri

KEY = "cluster.storage"
CREDENTIALS_HINT = {
    "s3": "endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and ~/.aws/)",
    "gs": "credentials come from GOOGLE_APPLICATION_CREDENTIALS or gcloud's default login",
    "gcs": "credentials come from GOOGLE_APPLICATION_CREDENTIALS or gcloud's default login",
}
#: A storage check must fail in seconds, not after botocore's minute of retries.
PROBE_OPTIONS = {"s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                                          "retries": {"max_attempts": 1}}}}


def root(storage: str | None) -> str | None:
    """The storage root as every worker should see it: a URI as given (no trailing /), a folder
    made absolute (workers do not share the driver's cwd), or None (not set)."""
    if storage is None:
        return None
    if is_uri(storage):
        return storage.rstrip("/")
    return str(Path(storage.removeprefix("file://")).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def check(storage: str | None) -> None:
    """Preflight: the storage answers and takes a write from this process (`ConfigError`)."""
    if storage is None:
        return
    if not is_uri(storage):
        folder = Path(root(storage))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".qlora-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(KEY, f"cannot write to the folder {folder}: {e.strerror or e}") from e
        return
    scheme = urlparse(storage).scheme
    hint = CREDENTIALS_HINT.get(scheme, "see the fsspec backend's documentation")
    try:
        from fsspec.core import url_to_fs

        # A fresh client: fsspec's cached one would not see the environment as it is now.
        fs, path = url_to_fs(storage, skip_instance_cache=True, **PROBE_OPTIONS.get(scheme, {}))
    except ImportError as e:
        raise ConfigError(KEY, f"{scheme}:// needs a library that is not installed: {e}") from e
    except ValueError as e:  # fsspec: "Protocol not known"
        raise ConfigError(KEY, f"{storage}: {e}; a local folder or a URI fsspec serves "
                               "(s3://, gs://, ...)") from e
    probe = f"{path.rstrip('/')}/.qlora-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"ok")
        if fs.cat_file(probe) != b"ok":
            raise OSError("an object written could not be read back")
        fs.rm(probe)
    except Exception as e:  # the backends raise their own (botocore, aiohttp, OSError)
        raise ConfigError(KEY, f"cannot write to {storage}: {_why(e)}; {hint}") from e


def copy_adapter(folder: Path, storage: str, parent_run_id: str, trial_folder: str) -> str:
    """Copy a trial's adapter folder to `<storage>/adapters/<parent run id>/<trial>/adapter`."""
    target = join(storage, "adapters", parent_run_id, trial_folder, "adapter")
    if is_uri(storage):
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(target)
        for file in sorted(folder.iterdir()):
            if file.is_file():
                fs.pipe_file(f"{path}/{file.name}", file.read_bytes())
    else:
        import shutil

        shutil.copytree(folder, target, dirs_exist_ok=True)
    return target


def _why(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    name = type(error).__name__
    return text if text.startswith(name) else f"{name}: {text}"


# -- tokenized data, shared through the storage ---------------------------------------------------

def put_data(folder: Path, storage: str) -> bool:
    """Upload a tokenized data folder (`qlora.data.cache_dir(key)`) to `<storage>/data/<key>/`
    unless it is there already; its meta.json goes last, so a folder with one is complete.
    Returns True when it uploaded."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(join(storage, "data", folder.name))
    if fs.exists(f"{path}/meta.json"):
        return False
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != "meta.json")
    for file in [*files, folder / "meta.json"]:
        fs.put_file(str(file), f"{path}/{file.name}")
    return True


def fetch_data(storage: str, key: str, folder: Path) -> bool:
    """Download `<storage>/data/<key>/` into `folder` (a new folder, renamed into place when
    complete; a file lock keeps the workers of one node to one download). Returns False when the
    storage has no such complete folder."""
    from filelock import FileLock
    from fsspec.core import url_to_fs

    from qlora.cachedir import new_folder

    fs, path = url_to_fs(join(storage, "data", key))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").exists():
            return True
        if not fs.exists(f"{path}/meta.json"):
            return False
        with new_folder(folder) as tmp:
            names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False))
            for name in [*(n for n in names if n != "meta.json"), "meta.json"]:
                fs.get_file(f"{path}/{name}", str(tmp / name))
            (tmp / "fetched").write_text(storage)  # where it came from: never tokenized here
    return True
