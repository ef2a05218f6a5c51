"""`python -m orchestrator.export SOURCE OUT [--merge] [--dtype bfloat16]`: take an adapter away.

SOURCE is what `orchestrator.load` takes (`models:/NAME@ALIAS`, `models:/NAME/VERSION`,
`runs:/RUN_ID`, a run id) or an adapter folder on disk (`outputs/<sweep>/<run>/<trial>/adapter`).

- Without `--merge`, OUT is a self-contained PEFT adapter folder: the adapter's two files, with
  `base_model_name_or_path` naming a base `from_pretrained` can load, and `qlora_base.json`
  holding the base's lineage (model, revision, quantization it was trained on).
- With `--merge`, OUT is the base with the adapter merged into it: the quantized base it trained
  on dequantized (`qlora.export.dequantized_model`), the adapter merged, saved as 16-bit (or
  `--dtype float32`) weights with its tokenizer and config, for
  `AutoModelForCausalLM.from_pretrained(OUT)` with no PEFT and no bitsandbytes.

Exit status 0, or 2 with one `error:` line for a source that names nothing loadable (a SQLite
tracking store that does not exist included: none is created).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")
BASE_FILE = "qlora_base.json"


class ExportError(ValueError):
    """The source or the output folder cannot be used."""


def adapter_source(source: str, tracking_uri: str, dst: Path) -> tuple[Path, dict[str, str]]:
    """The local adapter folder of `source` and its base lineage (`base_model`, `quant_type`...)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise ExportError(f"{source}: a folder without adapter_config.json (give an adapter "
                              "folder, a run id or models:/NAME@ALIAS)")
        lineage = {}
        if (folder / BASE_FILE).is_file():
            lineage = json.loads((folder / BASE_FILE).read_text())
        else:  # an adapter as a sweep writes it: its config names the base it loaded
            config = json.loads(config_file.read_text())
            lineage = {"base_model": config.get("base_model_name_or_path") or "tiny",
                       "base_revision": config.get("revision")}
        return folder, lineage
    import mlflow

    from orchestrator.load import disagreements, resolve, store_client

    _, artifacts, lineage, version = resolve(store_client(tracking_uri), source)
    for note in disagreements(version, lineage) if version is not None else []:
        print(f"warning: {source}: {note}", file=sys.stderr)
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifacts, dst_path=str(dst),
                                                   tracking_uri=tracking_uri))
    if not (got / "adapter_config.json").is_file():
        raise ExportError(f"{source}: {artifacts} holds no adapter_config.json")
    return got, lineage


def export(source: str, out: str | Path, *, merge: bool = False, dtype: str = "bfloat16",
           tracking_uri: str = "sqlite:///mlflow.db", device: str = "cpu",
           trust_remote_code: bool = False) -> Path:
    """Write the adapter `source` (or, with `merge`, its base with it merged) to `out`."""
    import torch

    from orchestrator.load import base_spec
    from qlora import load_base
    from qlora.base import resolve_source
    from qlora.export import dequantized_model, merge_adapter

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty (choose a new folder)")
    with tempfile.TemporaryDirectory(prefix="qlora-export-") as tmp:
        folder, lineage = adapter_source(source, tracking_uri, Path(tmp))
        spec = base_spec(lineage, trust_remote_code)  # before anything is written
        out.mkdir(parents=True, exist_ok=True)
        if not merge:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(folder / name, out / name)
            config = json.loads((out / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = resolve_source(spec)
            (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (out / BASE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
            return out
        base = load_base(spec, device)
        merged = merge_adapter(dequantized_model(base, getattr(torch, dtype)), folder)
        merged.save_pretrained(str(out))
        base.tokenizer.save_pretrained(str(out))
        (out / BASE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.export",
        description="Export an adapter as a self-contained PEFT folder, or merged into its base.")
    parser.add_argument("source", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, "
                                       "a run id, or an adapter folder")
    parser.add_argument("out", help="a new (or empty) folder")
    parser.add_argument("--merge", action="store_true",
                        help="write the base with the adapter merged (no PEFT needed to load it)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="weights of the merged model (default bfloat16)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--device", default="cpu", help="where the base is loaded to merge")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the base's model repository code (never taken from a tag)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException

    from orchestrator.load import LoadError, named

    try:
        out = export(args.source, args.out, merge=args.merge, dtype=args.dtype,
                     tracking_uri=args.tracking_uri, device=args.device,
                     trust_remote_code=args.trust_remote_code)
    except (ExportError, LoadError, MlflowException) as e:
        print(f"error: {named(args.source, e)}", file=sys.stderr)
        return 2
    what = "merged model" if args.merge else "adapter"
    print(f"{what} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
