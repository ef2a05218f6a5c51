"""`make bench`: the engine's ratios on this machine, printed as a table and saved as JSON.

    python -m bench                  # CPU: both shapes, both kinds of data, 3 runs of each
    python -m bench --gpu            # GPU: Llama-3-8B-shaped model (see bench/gpu.py)
    python -m bench --quick          # tiny only, fewer steps and K values, 1 run, for a smoke run
    python -m bench --runs 5 --kinds text

Every row is a ratio of two measurements taken in this same run, each in its own subprocess,
`--runs` times (packed and recipe alternating, so drift touches both alike): figures are the
median with [min-max]; a ratio is the median of the per-run ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from .engine import SHAPES, run_case

RESULTS = Path(__file__).parent / "results"


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, 1 thread"


def spread(values: list[float]) -> dict:
    """The median of `values` with their min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": list(values)}


def shown(s: dict, fmt: str = ".1f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def side_by_side(runs: int, a: tuple[str, dict], b: tuple[str, dict]) -> list[tuple[dict, dict]]:
    """Cases `a` and `b`, `runs` times each, alternating: [(a's result, b's result), ...]."""
    return [(run_case(*a), run_case(*b)) for _ in range(runs)]


def packing_rows(base_args: dict, ks: list[int], runs: int) -> list[dict]:
    """Packed K vs the standard recipe run K times in a row, each loading its base."""
    rows = []
    for k in ks:
        args = {**base_args, "k": k}
        pairs = side_by_side(runs, ("packed", args), ("recipe", args))
        rows.append({
            "shape": args["model"], "kind": args["kind"], "K": k, "runs": runs,
            "packed_s": spread([p["wall_s"] for p, _ in pairs]),
            "recipe_s": spread([r["wall_s"] for _, r in pairs]),
            "wall_ratio": spread([p["wall_s"] / r["wall_s"] for p, r in pairs]),
            "packed_peak_MiB": spread([p["peak_bytes"] / 2**20 for p, _ in pairs]),
            "recipe_peak_MiB": spread([r["peak_bytes"] / 2**20 for _, r in pairs]),
            "estimate_MiB": pairs[0][0]["estimate_bytes"] / 2**20,
            "measured_MiB": spread([p["pack_peak_bytes"] / 2**20 for p, _ in pairs]),
            "estimate_ratio": spread([p["estimate_bytes"] / p["pack_peak_bytes"]
                                      for p, _ in pairs]),
        })
        r = rows[-1]
        print(f"  {args['model']:4s} {args['kind']:11s} K={k}: packed {shown(r['packed_s'])}s vs "
              f"recipe x{k} {shown(r['recipe_s'])}s -> x{shown(r['wall_ratio'], '.2f')} wall | "
              f"peak RSS {r['packed_peak_MiB']['median']:.0f} vs "
              f"{r['recipe_peak_MiB']['median']:.0f} MiB | estimate {r['estimate_MiB']:.0f} vs "
              f"measured {shown(r['measured_MiB'], '.0f')} MiB "
              f"(x{shown(r['estimate_ratio'], '.2f')})", flush=True)
    return rows


def step_row(base_args: dict, runs: int) -> dict:
    """One adapter's step: this engine vs the standard recipe (steps 2..N, loads excluded)."""
    args = {**base_args, "k": 1}
    pairs = side_by_side(runs, ("engine_one", args), ("recipe", args))
    return {"shape": args["model"], "kind": args["kind"], "runs": runs,
            "engine_step_s": spread([o["step_s"] for o, _ in pairs]),
            "recipe_step_s": spread([t["step_s"] for _, t in pairs]),
            "step_ratio": spread([o["step_s"] / t["step_s"] for o, t in pairs])}


def profile_row(base_args: dict) -> dict:
    prof = run_case("profile", {**base_args, "k": 4})
    wall = prof["wall_s"]
    return {"wall_s": wall, "share": {k: v / wall for k, v in prof["seconds_by_label"].items()}}


def padding_row(seq_len: int) -> dict:
    import random

    from qlora import DataSpec
    from qlora.data import load_data
    from qlora.packing import padding_fraction
    from qlora.tiny import build_tokenizer

    tok = build_tokenizer()
    out = {}
    for mode in ("none", "pack"):
        rows = load_data(DataSpec(seq_len=seq_len, packing=mode), tok).train
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        batches = [order[i:i + 4] for i in range(0, len(order) - 3, 4)]
        out[mode] = sum(padding_fraction([len(rows[i].input_ids) for i in b])
                        for b in batches) / len(batches)
    return {"seq_len": seq_len, "padding_unpacked": out["none"], "padding_packed": out["pack"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU benchmark (bench/gpu.py)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and K values, 1 run")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs of every measurement, in fresh processes (default 3; 1 with "
                             "--quick)")
    parser.add_argument("--kinds", default="instruction,text",
                        help="kinds of data: instruction (bundled rows, prompt masked) and/or "
                             "text (full-length rows, loss on every token)")
    opts = parser.parse_args(argv)
    runs = opts.runs or (1 if opts.quick else 3)
    kinds = [k for k in opts.kinds.split(",") if k]
    if opts.gpu:
        from .gpu import main as gpu_main

        return gpu_main([])
    args = {"model": "tiny", "dtype": "float32", "seq_len": 128, "micro_batch": 2,
            "steps": 4 if opts.quick else 10}
    ks = [1, 4] if opts.quick else [1, 2, 4, 8]
    shapes = ["tiny"] if opts.quick else list(SHAPES)
    started = time.time()
    print(f"engine benchmarks on {_machine()}: r=16, dropout 0, NF4 + double quant, fp32, "
          f"gradient checkpointing, batch {args['micro_batch']} x {args['seq_len']}, "
          f"{args['steps']} steps per trial; shapes {', '.join(shapes)}", flush=True)
    for shape in shapes:  # build the models and the tokenized-data cache outside every timer
        for kind in kinds:
            run_case("packed", {**args, "model": shape, "kind": kind, "k": 1, "steps": 1})
    print("1. packed K vs the standard recipe (transformers+peft+bnb) K times in a row, each "
          "loading its base; wall with loads; estimate vs measured = the pack's RSS above the "
          "process's RSS before its base loaded", flush=True)
    report = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "args": args,
              "runs": runs, "kinds": kinds,
              "packing": [row for kind in kinds for shape in shapes
                          for row in packing_rows({**args, "model": shape, "kind": kind}, ks,
                                                  runs)]}
    print("2. one adapter's step time (K=1, steps 2..N): this engine vs the standard recipe",
          flush=True)
    report["step"] = []
    for kind in kinds:
        for shape in shapes:
            report["step"].append(r := step_row({**args, "model": shape, "kind": kind}, runs))
            ms = {k: {s: v * 1e3 for s, v in r[k].items() if s != "runs"}
                  for k in ("engine_step_s", "recipe_step_s")}
            print(f"  {shape:4s} {kind:11s}: {shown(ms['engine_step_s'], '.0f')} ms vs "
                  f"{shown(ms['recipe_step_s'], '.0f')} ms -> x{shown(r['step_ratio'], '.2f')}",
                  flush=True)
    print("3. where a packed run's time goes (K=4; labels nest: base_linear and lora run inside "
          "forward, and again inside backward when checkpointing recomputes the blocks)",
          flush=True)
    report["profile"] = p = profile_row({**args, "kind": kinds[0]})
    for label, share in sorted(p["share"].items(), key=lambda kv: -kv[1]):
        print(f"  {label:36s} {share:6.1%}")
    print("4. data packing: padding per batch of 4 on the bundled dataset", flush=True)
    report["padding"] = d = padding_row(512)
    print(f"  seq_len {d['seq_len']}: unpacked {d['padding_unpacked']:.1%}, "
          f"packed {d['padding_packed']:.1%}")
    print("5. orchestration overhead of `python -m orchestrator sweep=rank_grid` (defaults)",
          flush=True)
    from .orchestration import measure

    report["orchestration"] = o = measure([] if not opts.quick else ["train.max_steps=10"])
    print(f"  wall {o['wall_s']:.1f}s, busiest worker {o['busy_s']:.1f}s in training -> "
          f"overhead {o['overhead']:.1%} (startup {o['startup_s']:.1f}s, finish "
          f"{o['finish_s']:.1f}s)", flush=True)
    report["elapsed_s"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}  ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
