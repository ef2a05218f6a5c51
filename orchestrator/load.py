"""Load a trained adapter from MLflow as a `PeftModel` on the right base, quantized the right way.

    from orchestrator.load import alpaca_prompt, load_adapter, generate
    loaded = load_adapter("models:/best@champion", tracking_uri="sqlite:///mlflow.db")
    print(generate(loaded, alpaca_prompt(loaded.tokenizer, "Reverse the string.", "abc")))

    python -m orchestrator.load models:/best@champion --instruction "Reverse the string." --input abc
    python -m orchestrator.load RUN_ID --prompt "raw text, no template" --max-new-tokens 16

`--instruction` prompts as training renders an alpaca row (`alpaca_prompt`: the base's chat
template when its tokenizer has one), and every prompt is tokenized as training tokenizes a row's
prompt (`qlora.data.prompt_ids`), so the model is asked in the form it learned.

A reference is `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID[/adapter]` or a bare
run id. The base and its quantization come from the model version's lineage tags
(`orchestrator.tracking.registry`), or for a run from its params; they go through `qlora.load_base`, the
project's one way of building a base, and the adapter's files through
`peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.tracking.keys import ADAPTER_DIR, BASE_TAG_PREFIX, LINEAGE_PREFIX
from orchestrator.tracking.registry import BASE_PARAMS

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class LoadError(LookupError):
    """The reference names nothing loadable."""


@dataclass
class LoadedAdapter:
    """A PEFT model ready to generate, and where it came from."""

    model: object  # peft.PeftModel over base.model
    tokenizer: object
    base: object  # qlora.Base
    run_id: str
    adapter_dir: Path
    lineage: dict[str, str]  # base_model, quant_type, ... (the tag names without `qlora.`)
    version: object | None = None  # mlflow ModelVersion, for a models:/ reference
    notes: list[str] = field(default_factory=list)  # version tags that disagree with the run


def resolve(client, ref: str) -> tuple[str, str, dict[str, str], object | None]:
    """(run_id, adapter source URI, lineage, ModelVersion or None) of a reference."""
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, number = body.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise LoadError(f"{ref}: write models:/NAME@ALIAS or models:/NAME/VERSION")
        # The run's params are its record, written once by the sweep; a version's tags can be
        # set by anyone who may tag it. The run decides; `disagreements` reports the tags.
        return version.run_id, version.source, run_lineage(client.get_run(version.run_id)), \
            version
    run_id = ref
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].split("/", 1)[0]
    if not _RUN_ID.match(run_id):
        raise LoadError(f"{ref}: not models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or "
                        "a run id")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{ADAPTER_DIR}"
    return run_id, source, run_lineage(run), None


def run_lineage(run) -> dict[str, str]:
    """A trial run's base as its params recorded it (params are written once), with the GGUF
    file it was converted from (its `qlora.base.*` tags), in the version tags' names."""
    lineage = {tag: run.data.params[param] for param, tag in BASE_PARAMS.items()
               if param in run.data.params}
    lineage.update({"base_" + k[len(BASE_TAG_PREFIX):]: v for k, v in run.data.tags.items()
                    if k.startswith(BASE_TAG_PREFIX)})
    return lineage


def disagreements(version, lineage: dict[str, str]) -> list[str]:
    """Each lineage tag of a model version that differs from its run's record: reported, not
    followed (see `resolve`)."""
    notes = []
    for key, value in sorted(version.tags.items()):
        name = key[len(LINEAGE_PREFIX):]
        if key.startswith(LINEAGE_PREFIX) and name in lineage and lineage[name] != value:
            notes.append(f"tag {key}={value} disagrees with run {version.run_id}'s record "
                         f"({lineage[name]}); the run's record is used")
    return notes


def named(ref: str, error: BaseException) -> str:
    """`<ref>: <the error's first line>`, the reference named once (errors of `resolve` name it)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if text.startswith(f"{ref}: ") else f"{ref}: {text}"


def store_client(tracking_uri: str | None):
    """An `MlflowClient` on `tracking_uri` (None: MLflow's default), or `LoadError` for a SQLite
    store whose file does not exist: MLflow would create an empty one where the command runs,
    and an empty store holds no model."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().is_file():
        raise LoadError(f"no tracking store at {uri} (no such file; --tracking-uri names the "
                        "store the sweep wrote)")
    return MlflowClient(tracking_uri=tracking_uri)


def base_spec(lineage: dict[str, str], trust_remote_code: bool = False):
    """The `BaseSpec` an adapter was trained on, for inference (no gradient checkpointing).

    `trust_remote_code` is the caller's (`--trust-remote-code`), never the lineage's: tags and
    `qlora_base.json` are data anyone with write access to the store or the folder can set, and
    running a model repository's code is the user's decision. A lineage that asks for it without
    the flag is a `LoadError` saying so."""
    from qlora import BaseSpec

    def text(key, default=None):
        value = lineage.get(key, default)
        return None if value in (None, "None", "null", "") else value

    name = text("base_model", "tiny")
    if str(lineage.get("base_trust_remote_code", "False")).lower() == "true" and \
            not trust_remote_code:
        raise LoadError(f"its base {name} is recorded with trust_remote_code=true: loading it "
                        "would run that model repository's code; pass --trust-remote-code if "
                        "you trust it")
    commit = text("base_commit")
    spec = BaseSpec(
        name_or_path=name,
        # a hub base is loaded at the commit it trained on, not where its branch is now
        revision=commit if commit and _COMMIT.fullmatch(commit) else text("base_revision"),
        trust_remote_code=trust_remote_code,
        quant_type=text("quant_type", "nf4"),
        double_quant=str(lineage.get("quant_double_quant", "True")).lower() == "true",
        compute_dtype=text("quant_compute_dtype", "bfloat16"),
        gradient_checkpointing=False,
    )
    if commit:
        from qlora.base import base_commit

        try:
            found = base_commit(spec)
        except Exception as e:  # noqa: BLE001 - gone, unreachable, not that commit
            raise LoadError(f"its base {name} at {commit} cannot be found: "
                            f"{' '.join(str(e).split())[:300]}") from e
        if found != commit:
            raise LoadError(f"its base {name} is not the one it trained on: it trained on "
                            f"{commit}, and {name} is now {found}")
    return spec


def load_adapter(ref: str, tracking_uri: str | None = None, *, device: str | None = None,
                 dst: str | Path | None = None, trust_remote_code: bool = False) -> LoadedAdapter:
    """The adapter `ref` as a `PeftModel` in eval mode on its base (see the module's docstring).

    Artifacts are downloaded into `dst` (default: a new temporary folder).
    """
    import mlflow
    from peft import PeftModel

    from qlora import load_base

    client = store_client(tracking_uri)
    run_id, source, lineage, version = resolve(client, ref)
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="qlora-adapter-"))
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                      tracking_uri=tracking_uri))
    if not (folder / "adapter_config.json").is_file():
        raise LoadError(f"{ref}: {source} holds no adapter_config.json")
    base = load_base(base_spec(lineage, trust_remote_code), device)
    base.model.config.use_cache = True  # generation, not training
    model = PeftModel.from_pretrained(base.model, str(folder)).eval()
    notes = disagreements(version, lineage) if version is not None else []
    return LoadedAdapter(model, base.tokenizer, base, run_id, folder, lineage, version, notes)


def generate(loaded: LoadedAdapter, prompt: str, max_new_tokens: int = 32,
             min_new_tokens: int = 0) -> str:
    """Greedy continuation of `prompt` (the new text only), tokenized as training tokenizes a
    row's prompt (bos first); at least `min_new_tokens` tokens before the end-of-sequence token
    may end it."""
    import torch

    from qlora.data import prompt_ids

    tok = loaded.tokenizer
    ids = torch.tensor([prompt_ids(prompt, tok)], device=loaded.base.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    min_new_tokens=min(min_new_tokens, max_new_tokens),
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def alpaca_prompt(tokenizer, instruction: str, input_text: str = "") -> str:
    """The prompt part of the alpaca row (`instruction`, `input_text`) as training renders it
    with `tokenizer`: in its chat template when it has one, else the `### Instruction:` one."""
    from qlora.formats import render

    # Any non-empty answer: training's rows all have one, and the prompt does not depend on it.
    row = {"instruction": instruction, "input": input_text, "output": "?"}
    return render(row, "alpaca", tokenizer)[0]


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.load REF --prompt TEXT`: load, generate, print the new text."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.load",
        description="Load an adapter from MLflow (models:/NAME@champion, models:/NAME/VERSION, "
                    "runs:/RUN_ID or a run id) on its base and generate from a prompt.")
    parser.add_argument("ref", help="e.g. models:/best@champion")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the raw prompt text")
    what.add_argument("--instruction", help="an instruction, prompted as training renders an "
                                            "alpaca row (the base's chat template if it has one)")
    parser.add_argument("--input", default="", help="the instruction's input (with --instruction)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="tokens generated before the end-of-sequence token may stop it")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the base's model repository code (never taken from a tag)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout carries the generated text only
    try:
        loaded = load_adapter(args.ref, args.tracking_uri, device=args.device,
                              trust_remote_code=args.trust_remote_code)
    except (LoadError, MlflowException) as e:
        at = "" if args.tracking_uri in str(e) else f" (at {args.tracking_uri})"
        print(f"error: {named(args.ref, e)}{at}", file=sys.stderr)
        return 2
    for note in loaded.notes:
        print(f"warning: {args.ref}: {note}", file=sys.stderr)
    prompt = args.prompt
    if prompt is None:  # in the base's chat template where training used it
        prompt = alpaca_prompt(loaded.tokenizer, args.instruction, args.input)
    where = f"run {loaded.run_id}"
    if loaded.version is not None:
        where = f"{loaded.version.name} version {loaded.version.version} ({where})"
    print(f"# {where} on {loaded.lineage.get('base_model', '?')} "
          f"({loaded.lineage.get('quant_type', '?')})", file=sys.stderr)
    text = generate(loaded, prompt, args.max_new_tokens, args.min_new_tokens)
    if not text.strip():  # a blank line alone looks like a failure: say what happened
        print(f"# the answer is blank ({text!r}: only whitespace, or the end-of-sequence token "
              "at once); --min-new-tokens N makes the model write N tokens before it may stop",
              file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
