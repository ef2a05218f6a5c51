"""Quality of a real model under each quantization, and of adapters trained on it.

    python -m bench.quality                  # both tables (SmolLM2-135M; fetched on first use)
    python -m bench.quality --table 1        # perplexity per data type only
    python -m bench.quality --table 3        # which storage and init to pick (issue 24)
    python -m bench.quality --table 3 --seed 1                         # the same, other seeds
    python -m bench.quality --combine bench/results/quality-choice-seed*.json   # over the seeds
    python -m bench.quality --quick          # fewer windows and steps, for a smoke run

Table 1 is the QLoRA paper's Table 2 (arXiv 2305.14314) measured on SmolLM2-135M: perplexity on
held-out real English (the Brown corpus, see bench/corpus.py) with the base stored as fp32,
bf16, int8, nf4, nf4 + double quant, fp4, fp4 + double quant, and the storage bits per weight of
its linears measured from the tensors bitsandbytes holds. Every data type sees the same tokens.

Table 2 trains the same trials (one pack, the bundled tasks) on the NF4 base and on the 16-bit
(here fp32, quant.type=none) base, and reports the held-out eval loss of the base alone and of
each trial. The weights went through Q4_1 once (the package ships a Q4_1 GGUF file).

Table 3 is the choice a user makes: the same trials on NF4 + DQ with PEFT's init, NF4 + DQ with
LoftQ's, int8 and the 16-bit (fp32) base, each setting a pack of its own in a fresh process (so
its measured peak memory is its own), evaluated at 20 steps and at `--steps` (constant learning
rate after warmup, so the first evaluation is what a 20-step run gives): eval loss, its gap to
16-bit, exact match, bits per weight, and the peak memory while training (the process's RSS
above the runtime's, once the load's transient copies are given back; the load's own peak, which
holds the full-precision weights before they are quantized, is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from qlora import BaseSpec, DataSpec, TrialSpec, load_base, train_pack
from qlora.data import load_data
from qlora.evaluate import evaluate
from qlora.generate import judge
from qlora.memory import measured_bits_per_weight

from .corpus import PACKAGE, samples

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2_135m"
#: (label, quant_type, double_quant, compute_dtype)
DATA_TYPES = [
    ("fp32", "none", False, "float32"),
    ("bf16", "none", False, "bfloat16"),
    ("int8", "int8", False, "float32"),
    ("nf4", "nf4", False, "float32"),
    ("nf4 + DQ", "nf4", True, "float32"),
    ("fp4", "fp4", False, "float32"),
    ("fp4 + DQ", "fp4", True, "float32"),
]
#: The QLoRA paper, Table 2: Pile Common Crawl mean perplexity over 125M-13B OPT, BLOOM, LLaMA
#: and Pythia models (checked against the paper's text). bitsandbytes' fp4 is E2M1.
PAPER = {"int4": 34.34, "fp4 (E2M1)": 31.07, "fp4 (E3M0)": 29.48, "nf4 + DQ": 27.41}
PAPER_ROW = {"nf4 + DQ": "nf4 + DQ", "fp4": "fp4 (E2M1)"}
#: The trials of table 2: (r, alpha, learning rate).
TRIALS = [(8, 16.0, 1e-3), (16, 32.0, 1e-3), (8, 16.0, 3e-4), (16, 32.0, 3e-4)]


def held_out_windows(tokenizer, n_windows: int, window: int) -> list[list[int]]:
    """The first `window` tokens of `n_windows` Brown samples spread evenly over all 500 (every
    genre), each starting with the tokenizer's bos token when it has one."""
    docs = samples()
    step = len(docs) / n_windows
    picked = [docs[int(i * step)] for i in range(n_windows)]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for _, text in picked:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append((bos + ids)[:window])
    return out


@torch.no_grad()
def perplexity(base, windows: list[list[int]]) -> float:
    """exp of the mean next-token loss over every predicted token of every window."""
    total = count = 0.0
    for ids in windows:
        x = torch.tensor([ids], device=base.device)
        loss = base.model(input_ids=x, labels=x).loss.float().item()
        total += loss * (len(ids) - 1)
        count += len(ids) - 1
    return math.exp(total / count)


def table1(n_windows: int, window: int) -> list[dict]:
    rows = []
    for label, quant, dq, dtype in DATA_TYPES:
        started = time.time()
        base = load_base(BaseSpec(name_or_path=MODEL, quant_type=quant, double_quant=dq,
                                  compute_dtype=dtype, gradient_checkpointing=False), "cpu")
        windows = held_out_windows(base.tokenizer, n_windows, window)
        row = {"data_type": label, "bits_per_weight": measured_bits_per_weight(base.model),
               "perplexity": perplexity(base, windows),
               "tokens": sum(len(w) - 1 for w in windows), "wall_s": time.time() - started}
        rows.append(row)
        print(f"  {label:9s} {row['bits_per_weight']:7.3f} bits/weight  "
              f"perplexity {row['perplexity']:8.3f}  ({row['wall_s']:.0f} s)", flush=True)
        del base
    return rows


ANSWER_TOKENS = 16  # the bundled tasks' answers are a few tokens; eos ends most sooner


def _trials(steps: int, data: DataSpec, n_answers: int, grid: list = TRIALS, seed: int = 0,
            **knobs) -> list[TrialSpec]:
    """The tables' trials: one per (r, alpha, lr) of `grid`, trial k seeded 100 x seed + k."""
    return [TrialSpec(trial_id=f"r{r}-lr{lr:.0e}", seed=100 * seed + k, r=r, alpha=a,
                      learning_rate=lr, max_steps=steps, micro_batch_size=4, warmup_steps=2,
                      dropout=0.05, optimizer="adamw", eval_samples=n_answers,
                      eval_max_new_tokens=ANSWER_TOKENS, data=data, **knobs)
            for k, (r, a, lr) in enumerate(grid)]


def table2(steps: int, n_eval: int, n_answers: int) -> dict:
    data = DataSpec(seq_len=64, max_eval_examples=n_eval)
    out = {}
    for quant in ("nf4", "none"):
        started = time.time()
        base = load_base(BaseSpec(name_or_path=MODEL, quant_type=quant,
                                  compute_dtype="float32", gradient_checkpointing=False), "cpu")
        eval_examples = load_data(data, base.tokenizer).eval
        # The base alone: a slot with no adapter routes its rows through the frozen base only.
        alone = TrialSpec(trial_id="base", eval_samples=n_answers,
                          eval_max_new_tokens=ANSWER_TOKENS, data=data)
        base_loss = evaluate(base, [("base", eval_examples)])[0]
        (base_scores, base_samples), = judge(base, [("base", eval_examples, alone)])
        results = train_pack(base, _trials(steps, data, n_answers))
        out[quant] = {
            "base": {"eval_loss": base_loss, **base_scores, "samples": base_samples[:3]},
            "wall_s": time.time() - started,
            "trials": {r.trial_id: {"status": str(r.status), **r.eval_metrics,
                                    "final_train_loss": r.train_losses[-1],
                                    "samples": r.samples[:3]}
                       for r in results}}
        print(f"  quant {quant}: base alone eval loss {base_loss:.4f} exact match "
              f"{base_scores.get('eval_exact_match', float('nan')):.3f}; "
              + "; ".join(f"{k} {v['eval_loss']:.4f} / {v.get('eval_exact_match', 0):.3f}"
                          for k, v in out[quant]["trials"].items())
              + f"  ({out[quant]['wall_s']:.0f} s)", flush=True)
        del base
    return out


#: Table 3's settings: (label, quant_type, double_quant, lora init).
SETTINGS = [
    ("NF4 + DQ, gaussian init", "nf4", True, "gaussian"),
    ("NF4 + DQ, LoftQ init", "nf4", True, "loftq"),
    ("int8", "int8", False, "gaussian"),
    ("16-bit (fp32)", "none", False, "gaussian"),
]
#: Table 3's trials: (r, alpha, learning rate), rank 16 where LoftQ has room to fit the error.
CHOICE_TRIALS = [(16, 32.0, 1e-3), (16, 32.0, 3e-4)]
FIRST_EVAL = 20  # today's table 2 length


def run_setting(label: str, steps: int, n_eval: int, n_answers: int, seed: int = 0) -> dict:
    """One setting of table 3 in this process: its base, its trials as one pack, the eval loss
    and exact match of each trial at every evaluation, bits per weight, peak memory."""
    from qlora.base import load_tokenizer
    from qlora.memory import peak_bytes, reset_peak, rss_bytes

    _, quant, dq, init = next(s for s in SETTINGS if s[0] == label)
    data = DataSpec(seq_len=64, max_eval_examples=n_eval)
    trials = _trials(steps, data, n_answers, CHOICE_TRIALS, seed, lr_schedule="constant",
                     init=init, eval_every=min(FIRST_EVAL, steps))
    # Tokenized and cached before the peak starts (the tokenizer does not depend on storage).
    load_data(data, load_tokenizer(BaseSpec(name_or_path=MODEL)))
    rss0 = rss_bytes()
    reset_peak()
    started = time.time()
    base = load_base(BaseSpec(name_or_path=MODEL, quant_type=quant, double_quant=dq,
                              compute_dtype="float32", gradient_checkpointing=False), "cpu")
    load_peak = peak_bytes() - rss0
    _give_back_freed_memory()  # the load's transient copies, so the next peak is training's
    reset_peak()
    evals: dict[str, dict] = {t.trial_id: {} for t in trials}

    def on_metrics(trial_id, step, metrics):
        if "eval_loss" in metrics:
            evals[trial_id][step] = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        return False

    results = train_pack(base, trials, on_metrics=on_metrics)
    return {"setting": label, "seed": seed, "quant_type": quant, "double_quant": dq, "init": init,
            "bits_per_weight": measured_bits_per_weight(base.model),
            "peak_bytes": peak_bytes() - rss0, "load_peak_bytes": load_peak,
            "wall_s": time.time() - started,
            "trials": {r.trial_id: {"status": str(r.status), "evals": evals[r.trial_id]}
                       for r in results}}


def _give_back_freed_memory() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the training peak then includes what the load left freed
        pass


def table3(steps: int, n_eval: int, n_answers: int, seed: int = 0) -> list[dict]:
    """Each setting in a fresh `python -m bench.quality --setting LABEL` process."""
    import subprocess
    import sys

    rows = []
    for label, *_ in SETTINGS:
        out = subprocess.run([sys.executable, "-m", "bench.quality", "--setting", label,
                              "--steps", str(steps), "--eval", str(n_eval),
                              "--answers", str(n_answers), "--seed", str(seed)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        finals = "; ".join(f"{t} " + ", ".join(f"step {s}: {e['eval_loss']:.4f} / "
                                                f"{e.get('eval_exact_match', 0):.3f}"
                                                for s, e in sorted(v["evals"].items(),
                                                                   key=lambda x: int(x[0]))
                                                if int(s) in (FIRST_EVAL, steps))
                           for t, v in row["trials"].items())
        print(f"  {label}: {row['bits_per_weight']:.3f} bits/weight, peak "
              f"{row['peak_bytes'] / 2**20:.0f} MiB; {finals}  ({row['wall_s']:.0f} s)",
              flush=True)
    return rows


def _table3_markdown(rows: list[dict], steps: int) -> list[str]:
    ref = next(r for r in rows if r["quant_type"] == "none")
    lines = [f"| setting | trial | eval loss @{FIRST_EVAL} | gap to 16-bit @{FIRST_EVAL} "
             f"| exact match @{FIRST_EVAL} | eval loss @{steps} | gap to 16-bit @{steps} "
             f"| exact match @{steps} | bits per weight | peak memory training (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        for trial, v in row["trials"].items():
            ev = {int(s): e for s, e in v["evals"].items()}
            rv = {int(s): e for s, e in ref["trials"][trial]["evals"].items()}
            cells = []
            for step in (FIRST_EVAL, steps):
                e, r = ev.get(step, {}), rv.get(step, {})
                loss = e.get("eval_loss", float("nan"))
                cells += [f"{loss:.4f}", f"{loss - r.get('eval_loss', float('nan')):+.4f}",
                          f"{e.get('eval_exact_match', float('nan')):.3f}"]
            lines.append(f"| {row['setting']} | {trial} | " + " | ".join(cells)
                         + f" | {row['bits_per_weight']:.3f} | {row['peak_bytes'] / 2**20:.0f} |")
    return lines


def combine(paths: list[str]) -> str:
    """Table 3 over several seeds (`--combine FILE ...`, the JSON files of `--table 3 --seed N`):
    per setting and step, the mean over every trial and seed of the eval loss, its gap to the
    16-bit base's same trial and seed, and exact match, each with its min..max."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    steps = {r["args"]["steps"] for r in reports}
    if len(steps) != 1:
        raise SystemExit(f"--combine: the files ran different --steps: {sorted(steps)}")
    [last] = steps
    labels = [row["setting"] for row in reports[0]["table3"]]
    cells: dict[tuple, list] = {}
    for report in reports:
        ref = next(r for r in report["table3"] if r["quant_type"] == "none")
        for row in report["table3"]:
            for trial, v in row["trials"].items():
                for step in (FIRST_EVAL, last):
                    e = v["evals"][str(step)]
                    r = ref["trials"][trial]["evals"][str(step)]
                    key = (row["setting"], step)
                    cells.setdefault(key + ("loss",), []).append(e["eval_loss"])
                    cells.setdefault(key + ("gap",), []).append(e["eval_loss"] - r["eval_loss"])
                    cells.setdefault(key + ("em",), []).append(e.get("eval_exact_match", math.nan))
            cells.setdefault((row["setting"], "peak"), []).append(row["peak_bytes"] / 2**20)
            cells[(row["setting"], "bits")] = [row["bits_per_weight"]]

    def spread(values: list, fmt: str) -> str:
        mean = sum(values) / len(values)
        return f"{mean:{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"

    seeds = sorted({row.get("seed", 0) for r in reports for row in r["table3"]})
    lines = [f"seeds {seeds}, {len(reports[0]['table3'][0]['trials'])} trials each: mean "
             "(min..max) over every trial and seed", "",
             "| setting | step | eval loss | gap to 16-bit | exact match | bits per weight "
             "| peak memory training (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        for step in (FIRST_EVAL, last):
            key = (label, step)
            lines.append(f"| {label} | {step} | {spread(cells[key + ('loss',)], '.4f')} | "
                         f"{spread(cells[key + ('gap',)], '+.4f')} | "
                         f"{spread(cells[key + ('em',)], '.3f')} | "
                         f"{cells[(label, 'bits')][0]:.3f} | "
                         f"{spread(cells[(label, 'peak')], '.0f')} |")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    lines = []
    if "table1" in report:
        lines += ["| data type | bits per weight (measured) | perplexity, Brown held-out "
                  "| QLoRA paper Table 2 (Pile-CC mean PPL) |", "| --- | ---: | ---: | ---: |"]
        for row in report["table1"]:
            paper = PAPER.get(PAPER_ROW.get(row["data_type"], ""), None)
            lines.append(f"| {row['data_type']} | {row['bits_per_weight']:.3f} | "
                         f"{row['perplexity']:.3f} | {'' if paper is None else paper} |")
        lines.append("")
    if "table2" in report:
        t2 = report["table2"]
        rows = [("base alone", t2["nf4"]["base"], t2["none"]["base"])]
        rows += [(i, t2["nf4"]["trials"][i], t2["none"]["trials"][i]) for i in t2["nf4"]["trials"]]
        lines += ["| held-out | eval loss NF4 | eval loss 16-bit | NF4 - 16-bit "
                  "| exact match NF4 | exact match 16-bit |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, a, b in rows:
            lines.append(f"| {name} | {a['eval_loss']:.4f} | {b['eval_loss']:.4f} | "
                         f"{a['eval_loss'] - b['eval_loss']:+.4f} | "
                         f"{a.get('eval_exact_match', float('nan')):.3f} | "
                         f"{b.get('eval_exact_match', float('nan')):.3f} |")
        lines.append("")
    if "table3" in report:
        lines += _table3_markdown(report["table3"], report["args"]["steps"])
    return "\n".join(lines)


def _machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} thread(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["1", "2", "3", "both"], default="both",
                        help="both = tables 1 and 2; table 3 runs alone (its own --steps)")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # table 3's child process
    parser.add_argument("--seed", type=int, default=0,
                        help="table 3: trial k trains with seed 100 x SEED + k (data order, "
                             "dropout, Gaussian init)")
    parser.add_argument("--quick", action="store_true", help="fewer windows and steps")
    parser.add_argument("--windows", type=int, default=16, help="Brown samples (table 1)")
    parser.add_argument("--window", type=int, default=256, help="tokens per sample (table 1)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (table 2)")
    parser.add_argument("--eval", type=int, default=64, help="held-out examples (table 2)")
    parser.add_argument("--answers", type=int, default=32,
                        help="held-out prompts answered greedily for exact match (table 2)")
    parser.add_argument("--combine", nargs="+", metavar="FILE",
                        help="print table 3 over the seeds of these --table 3 JSON files")
    opts = parser.parse_args(argv)
    if opts.combine:
        print(combine(opts.combine))
        return 0
    if opts.quick:
        opts.windows, opts.window, opts.steps, opts.eval, opts.answers = 2, 64, 2, 8, 4
    if opts.setting:  # one setting of table 3, its row as the last line of stdout
        print(json.dumps(run_setting(opts.setting, opts.steps, opts.eval, opts.answers,
                                     opts.seed)))
        return 0
    started = time.time()
    report = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "model": MODEL,
              "corpus": PACKAGE, "args": vars(opts)}
    if opts.table in ("1", "both"):
        print(f"1. perplexity of {MODEL} per data type: {opts.windows} Brown samples x "
              f"{opts.window} tokens ({PACKAGE})", flush=True)
        report["table1"] = table1(opts.windows, opts.window)
    if opts.table in ("2", "both"):
        print(f"2. {len(TRIALS)} trials packed, {opts.steps} steps, on the NF4 and the 16-bit base; "
              f"eval loss on {opts.eval} held-out bundled examples, exact match of greedy answers "
              f"to the first {opts.answers}", flush=True)
        report["table2"] = table2(opts.steps, opts.eval, opts.answers)
    if opts.table == "3":
        print(f"3. {len(CHOICE_TRIALS)} trials per setting, {opts.steps} steps (constant lr), "
              f"eval at {min(FIRST_EVAL, opts.steps)} and {opts.steps} on {opts.eval} held-out "
              f"examples, exact match on {opts.answers}", flush=True)
        report["table3"] = table3(opts.steps, opts.eval, opts.answers, opts.seed)
    report["wall_s"] = time.time() - started
    print(_markdown(report))
    print(f"wall time {report['wall_s']:.0f} s on {report['machine']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"quality-choice-seed{opts.seed}.json" if opts.table == "3" else "quality.json"
    (RESULTS / name).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
