"""`make bench`: the engine's ratios on this machine, printed as a table and saved as JSON.

    python -m bench                  # CPU: tiny and wide shapes (about 6 minutes on 2 cores)
    python -m bench --gpu            # GPU: Llama-3-8B-shaped model (see bench/gpu.py)
    python -m bench --quick          # tiny only, fewer steps and K values, for a smoke run

Every row is a ratio of two measurements taken in this same run, each in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def packing_rows(base_args: dict, ks: list[int]) -> list[dict]:
    """Packed K vs the standard recipe run K times in a row, each loading its base."""
    rows = []
    for k in ks:
        args = {**base_args, "k": k}
        packed, recipe = run_case("packed", args), run_case("recipe", args)
        rows.append({
            "shape": args["model"], "K": k, "packed_s": packed["wall_s"],
            "recipe_s": recipe["wall_s"], "wall_ratio": packed["wall_s"] / recipe["wall_s"],
            "packed_peak_MiB": packed["peak_bytes"] / 2**20,
            "recipe_peak_MiB": recipe["peak_bytes"] / 2**20,
            "estimate_MiB": packed["estimate_bytes"] / 2**20,
            "measured_MiB": packed["pack_peak_bytes"] / 2**20,
            "estimate_ratio": packed["estimate_bytes"] / packed["pack_peak_bytes"],
        })
        r = rows[-1]
        print(f"  {args['model']:4s} K={k}: packed {r['packed_s']:5.1f}s vs recipe x{k} "
              f"{r['recipe_s']:5.1f}s -> x{r['wall_ratio']:.2f} wall | peak RSS "
              f"{r['packed_peak_MiB']:.0f} vs {r['recipe_peak_MiB']:.0f} MiB | estimate "
              f"{r['estimate_MiB']:.0f} vs measured {r['measured_MiB']:.0f} MiB "
              f"(x{r['estimate_ratio']:.2f})", flush=True)
    return rows


def step_row(base_args: dict) -> dict:
    """One adapter's step: this engine vs the standard recipe (steps 2..N, loads excluded)."""
    args = {**base_args, "k": 1}
    ours, theirs = run_case("engine_one", args), run_case("recipe", args)
    return {"shape": args["model"], "engine_step_s": ours["step_s"],
            "recipe_step_s": theirs["step_s"], "step_ratio": ours["step_s"] / theirs["step_s"]}


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
    parser.add_argument("--quick", action="store_true", help="fewer steps and K values")
    opts = parser.parse_args(argv)
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
        run_case("packed", {**args, "model": shape, "k": 1, "steps": 1})
    print("1. packed K vs the standard recipe (transformers+peft+bnb) K times in a row, each "
          "loading its base; wall with loads; estimate vs measured = the pack's RSS above the "
          "process's RSS before its base loaded", flush=True)
    report = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "args": args,
              "packing": [row for shape in shapes
                          for row in packing_rows({**args, "model": shape}, ks)]}
    print("2. one adapter's step time (K=1, steps 2..N): this engine vs the standard recipe",
          flush=True)
    report["step"] = []
    for shape in shapes:
        report["step"].append(r := step_row({**args, "model": shape}))
        print(f"  {shape:4s}: {r['engine_step_s'] * 1e3:.0f} ms vs {r['recipe_step_s'] * 1e3:.0f}"
              f" ms -> x{r['step_ratio']:.2f}", flush=True)
    print("3. where a packed run's time goes (K=4; labels nest: base_linear and lora run inside "
          "forward, and again inside backward when checkpointing recomputes the blocks)",
          flush=True)
    report["profile"] = p = profile_row(args)
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
