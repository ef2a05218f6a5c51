"""Engine benchmarks, each a ratio measured side by side in one run.

Every measured configuration runs in a fresh subprocess (`python -m bench.engine CASE JSON`), so
its peak memory (CUDA: `max_memory_allocated`; CPU: peak RSS) is its own and one case's caches
cannot flatter the next. Needs only torch, transformers, peft, bitsandbytes: no Ray or MLflow.

Every trial: r=16, alpha 16, dropout 0, its own seed, fp32 compute, NF4 + double quant, gradient
checkpointing, paged AdamW 32-bit, at the given seq_len and micro-batch, on one of two kinds of
data (`kind`): `instruction`, the bundled rows with the prompt masked (the engine forms logits
only where labels are kept, HF's loss everywhere), or `text`, the Brown corpus's samples as
full-length rows with the loss on every token (`data.format=text`, `train_on_prompt`).

Cases:
- `packed`    : K trials trained together on one base, load, final evaluation and adapter export
                included; also the pack's `estimate_memory` and its measured peak (CPU: RSS
                high-water above the RSS before the base loaded).
- `recipe`    : the same K trials with the standard QLoRA recipe (`standard_recipe`: transformers
                `BitsAndBytesConfig`, `prepare_model_for_kbit_training`, `get_peft_model`, paged
                AdamW), one after another in one process, each loading its own base and ending
                with the same final evaluation: wall time is the sum, peak the max. `step_s` is its first trial's mean step.
- `engine_one`: one trial with this engine, `step_s` timed like the recipe's (steps 2..N).
- `profile`   : where one packed step's time goes (torch.profiler, labels from the engine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

RANK = 16
#: The shapes the CPU rows run at: the tiny model (2 layers, width 128) and a wider one (4 layers,
#: width 512, random weights: speed and memory do not depend on what the weights hold).
SHAPES = {"tiny": {}, "wide": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8)}


def model_source(shape: str) -> str:
    """The folder `from_pretrained` loads for a bench shape (built once, cached)."""
    from qlora.tiny import tiny_model_path

    return str(tiny_model_path(**SHAPES[shape]))


def text_data() -> str:
    """The Brown corpus's 500 samples as a JSONL of {"text": ...} rows, each far longer than
    any bench seq_len: every row is full (built once in the model cache)."""
    from qlora.tiny import build_once, cache_root

    from .corpus import samples

    out = cache_root() / "bench" / "brown-text"

    def write(tmp) -> None:
        with open(tmp / "train.jsonl", "w") as f:
            for _, text in samples():
                f.write(json.dumps({"text": text}) + "\n")

    return str(build_once(out, write, lambda p: (p / "train.jsonl").is_file()) / "train.jsonl")


def _peak_bytes() -> int:
    """The process's peak: CUDA max allocated, or its RSS high-water (runtime included)."""
    from qlora.memory import peak_bytes

    return peak_bytes()


def _setup(args: dict):
    import bitsandbytes  # noqa: F401  (imports before any timer starts, in every case)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    from qlora import BaseSpec, DataSpec, TrialSpec

    base = BaseSpec(name_or_path=model_source(args["model"]), compute_dtype=args["dtype"],
                    gradient_checkpointing=True)
    if args.get("kind", "instruction") == "text":
        data = DataSpec(seq_len=args["seq_len"], max_eval_examples=8, path=text_data(),
                        format="text", train_on_prompt=True)
    else:
        data = DataSpec(seq_len=args["seq_len"], max_eval_examples=8, path=args.get("data"))
    trials = [TrialSpec(trial_id=f"k{k}", seed=k, r=args.get("r", RANK), alpha=16.0,
                        dropout=args.get("dropout", 0.0),
                        learning_rate=1e-3, max_steps=args["steps"],
                        micro_batch_size=args["micro_batch"], data=data,
                        optimizer=args.get("optimizer", "paged_adamw_32bit"))
              for k in range(args["k"])]
    return base, trials


def case_packed(args: dict) -> dict:
    from qlora import estimate_memory, load_base, train_pack

    spec, trials = _setup(args)
    from qlora.memory import rss_bytes

    # As the driver does (orchestrator.cluster.datashare.prepare): the data tokenized, its
    # longest rows given to the estimate. Opening it also imports what reading it needs
    # (pyarrow), a worker's runtime, which the estimate leaves out as it leaves torch out.
    rows = _rows(spec, trials)
    estimate = estimate_memory(spec, trials, device_type="cuda" if _cuda() else "cpu",
                               rows=rows).total
    before = 0 if _cuda() else rss_bytes()
    t0 = time.perf_counter()
    base = load_base(spec)
    t_load = time.perf_counter() - t0
    results = train_pack(base, trials)
    wall = time.perf_counter() - t0
    # What the estimate predicts: CUDA max allocated, or on a CPU the RSS high-water above the
    # RSS the imports had already taken before the base loaded.
    return {"wall_s": wall, "load_s": t_load, "peak_bytes": _peak_bytes(),
            "pack_peak_bytes": _peak_bytes() - before, "estimate_bytes": estimate,
            "losses": [r.train_losses[-1] for r in results]}


def _rows(spec, trials) -> dict:
    """{DataSpec: RowTokens} of the trials' data, tokenized (or opened from the cache)."""
    from transformers import AutoTokenizer

    from qlora.base import resolve_source
    from qlora.data import load_data
    from qlora.memory import rows_of

    tok = AutoTokenizer.from_pretrained(resolve_source(spec))
    out = {}
    for t in trials:
        if t.data not in out and (row := rows_of(load_data(t.data, tok))) is not None:
            out[t.data] = row
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def standard_recipe(path: str, dtype_name: str, r: int, alpha: float, lr: float,
                    dropout: float = 0.05):
    """The QLoRA paper's recipe with transformers + peft + bitsandbytes: nf4 + double quant,
    `prepare_model_for_kbit_training`, `get_peft_model` on all linears, paged AdamW 32-bit,
    gradient checkpointing. Returns (model, trainable params, optimizer).

    Its 4-bit linears get `_keep_cpu_layout` like the engine's, so on AVX512-BF16 CPUs both sides
    compute in the same dtype through the same kernels (see qlora/base.py)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.base import DTYPES, _keep_cpu_layout

    dtype = DTYPES[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype),
        device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    _keep_cpu_layout(model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=0.0)


def recipe_steps(spec, trial, after_step=None):
    """Load the base and train `trial` with `standard_recipe` (the engine's data, order and
    batches); `after_step(i)` runs after step i. Returns (model, tokenizer, data, step ends)."""
    import torch
    from transformers import AutoTokenizer

    from qlora.base import resolve_source
    from qlora.data import load_data
    from qlora.stream import TrialStream, collate

    model, params, opt = standard_recipe(resolve_source(spec), spec.compute_dtype, trial.r,
                                         trial.alpha, trial.learning_rate, trial.dropout)
    tok = AutoTokenizer.from_pretrained(resolve_source(spec))
    data = load_data(trial.data, tok)
    stream = TrialStream(len(data.train), trial.micro_batch_size, trial.seed)
    device = next(model.parameters()).device
    model.train()
    marks = []
    for step in range(trial.max_steps):
        batch = collate([[data.train[i] for i in stream.next_indices()]],
                        tok.pad_token_id, device)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if after_step is not None:
            after_step(step)
    return model, tok, data, marks


def _recipe_trial(spec, trial) -> float:
    """Load the base, train one trial with `standard_recipe` and evaluate it once on its held-out
    examples (as the engine does at a trial's end); returns the mean step time over steps 2..N
    (step 1 holds one-time warm-up, as in `case_engine_one`)."""
    import torch

    from qlora.evaluate import EVAL_BATCH_SIZE
    from qlora.stream import collate

    model, tok, data, marks = recipe_steps(spec, trial)
    device = next(model.parameters()).device
    # The final evaluation the engine runs for every trial: the same held-out examples, batched.
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.eval), EVAL_BATCH_SIZE):
            batch = collate([data.eval[i:i + EVAL_BATCH_SIZE]], tok.pad_token_id, device)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  labels=batch.labels)
    return (marks[-1] - marks[0]) / max(1, len(marks) - 1)


def case_recipe(args: dict) -> dict:
    """The standard QLoRA recipe (`standard_recipe`) for K trials in a row, each loading its own
    base (what a shell loop over `train.py` does, minus Python start): wall is the sum."""
    import gc

    spec, trials = _setup(args)
    t0 = time.perf_counter()
    steps = []
    for trial in trials:
        steps.append(_recipe_trial(spec, trial))
        gc.collect()
    return {"wall_s": time.perf_counter() - t0, "peak_bytes": _peak_bytes(), "step_s": steps[0]}


def case_engine_one(args: dict) -> dict:
    """One adapter with this engine, timed like `case_recipe` (load, then the steps)."""
    import torch

    from qlora import load_base, train_pack

    spec, trials = _setup(args)
    t0 = time.perf_counter()
    base = load_base(spec)
    marks = []
    train_pack(base, trials[:1], datasets=None,
               on_metrics=lambda t, s, m: "train_loss" in m and marks.append(time.perf_counter()) and None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # The first on_metrics call comes after step 1; time steps 2..N to leave data loading out.
    step_s = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
    return {"wall_s": time.perf_counter() - t0, "peak_bytes": _peak_bytes(), "step_s": step_s}


def case_profile(args: dict) -> dict:
    """Share of a packed training step's time by label (forward/backward of base and adapters,
    dequantization, optimizer, data)."""
    from torch.profiler import ProfilerActivity, profile

    from qlora import load_base, train_pack

    spec, trials = _setup(args)
    base = load_base(spec)
    train_pack(base, [t.__class__(**{**t.__dict__, "max_steps": 2}) for t in trials])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        train_pack(base, trials)
        wall = time.perf_counter() - t0
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith(("qlora.", "bitsandbytes::")):
            totals[evt.key] = totals.get(evt.key, 0.0) + evt.cpu_time_total / 1e6
    return {"wall_s": wall, "seconds_by_label": totals}


CASES = {"packed": case_packed, "recipe": case_recipe,
         "engine_one": case_engine_one, "profile": case_profile}


def run_case(case: str, args: dict, module: str = "bench.engine") -> dict:
    """Run one case of `module` (`python -m MODULE CASE ARGS`) in a fresh subprocess and return
    its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", module, case, json.dumps(args)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    result = CASES[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
