"""Successive halving and population-based training against the grid: the same 12 trials.

Runs `python -m orchestrator sweep=grid`, `sweep=asha` and `sweep=pbt` as a user would (each a
subprocess in its own scratch folder, MLflow store included), with the same overrides, once per
seed, and reads back each sweep's `summary.json` (`search`: the best trial's final eval_loss and
the optimizer steps trained). The sweeps hold the same trials (same ids, so the same numbers for
every step grid and ASHA both train); ASHA stops the worse ones at its rungs and backfills their
slots; PBT trains every trial its full budget (the grid's steps), in two packs of 6 (one per
rank), where every 10 steps the worst of a pack takes the state of its best, learning rate x0.8
or x1.2.

    python -m bench.search                          # seeds 0 and 1, tiny model, bundled data
    python -m bench.search --seeds 0 train.max_steps=120   # any Hydra overrides, given to all

Prints the figures and their ratios; writes bench/results/search-<date>-<time>.json. The
acceptance it measures: ASHA's best within 2% of the grid's, for at most half its steps; PBT's
best better than the grid's, for no more steps.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAX_LOSS_GAP = 0.02  # ASHA's best eval_loss at most 2% above the grid's
MAX_STEPS_RATIO = 0.5  # for at most half the grid's training steps
PBT_OVERRIDES = ["pack.max_adapters=6"]  # a population per pack: the 6 trials of a rank


def run(sweep: str, overrides: list[str]) -> dict:
    """One sweep through the CLI in a scratch folder: its summary's figures and its wall time."""
    with tempfile.TemporaryDirectory(prefix=f"bench-search-{sweep}-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "orchestrator", f"sweep={sweep}", *overrides],
                              cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(f"sweep={sweep} exited {done.returncode}:\n{done.stderr[-3000:]}")
        summary = json.loads((Path(tmp) / "outputs" / sweep / "latest" / "summary.json").read_text())
    fig = summary["search"]
    return {"sweep": sweep, "wall_s": wall, "trials": len(summary["trials"]),
            "best_trial": fig["best_trial"], "best_eval_loss": fig["best_eval_loss"],
            "training_steps": fig["training_steps"], "stopped_early": fig["stopped_early"],
            "finished": [r["name"] for r in summary["trials"] if r["status"] == "finished"]}


def _machine() -> str:
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _one_seed(overrides: list[str]) -> dict:
    grid = run("grid", overrides)
    print(f"  grid: best eval_loss {grid['best_eval_loss']:.4f} ({grid['best_trial']}), "
          f"{grid['training_steps']} training steps, {grid['wall_s']:.0f}s", flush=True)
    asha = run("asha", overrides)
    print(f"  asha: best eval_loss {asha['best_eval_loss']:.4f} ({asha['best_trial']}), "
          f"{asha['training_steps']} training steps, {asha['wall_s']:.0f}s "
          f"({asha['stopped_early']} of {asha['trials']} stopped early)", flush=True)
    pbt = run("pbt", [*overrides, *PBT_OVERRIDES])
    print(f"  pbt:  best eval_loss {pbt['best_eval_loss']:.4f} ({pbt['best_trial']}), "
          f"{pbt['training_steps']} training steps, {pbt['wall_s']:.0f}s", flush=True)
    gap = asha["best_eval_loss"] / grid["best_eval_loss"] - 1
    steps = asha["training_steps"] / grid["training_steps"]
    asha_ok = gap <= MAX_LOSS_GAP and steps <= MAX_STEPS_RATIO
    pbt_gap = pbt["best_eval_loss"] / grid["best_eval_loss"] - 1
    pbt_steps = pbt["training_steps"] / grid["training_steps"]
    pbt_ok = pbt_gap < 0 and pbt_steps <= 1
    print(f"  asha/grid: eval_loss x{1 + gap:.4f} ({gap:+.2%}; at most +{MAX_LOSS_GAP:.0%}), "
          f"steps x{steps:.3f} (at most x{MAX_STEPS_RATIO}), wall x{asha['wall_s'] / grid['wall_s']:.2f}"
          f"  -> {'PASS' if asha_ok else 'FAIL'}", flush=True)
    print(f"  pbt/grid:  eval_loss x{1 + pbt_gap:.4f} ({pbt_gap:+.2%}; below 0), steps "
          f"x{pbt_steps:.3f} (at most x1), wall x{pbt['wall_s'] / grid['wall_s']:.2f}"
          f"  -> {'PASS' if pbt_ok else 'FAIL'}", flush=True)
    return {"overrides": overrides, "grid": grid, "asha": asha, "pbt": pbt,
            "eval_loss_ratio": 1 + gap, "eval_loss_gap": gap, "steps_ratio": steps,
            "wall_ratio": asha["wall_s"] / grid["wall_s"], "asha_pass": asha_ok,
            "pbt_eval_loss_gap": pbt_gap, "pbt_steps_ratio": pbt_steps,
            "pbt_wall_ratio": pbt["wall_s"] / grid["wall_s"], "pbt_pass": pbt_ok}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    seeds = ["0", "1"]
    if "--seeds" in args:
        i = args.index("--seeds")
        seeds = args[i + 1].split(",")
        del args[i:i + 2]
    print(f"ASHA and PBT vs grid on {_machine()}: the same trials, seeds {','.join(seeds)}, "
          f"overrides {args or 'none'}", flush=True)
    runs = []
    for seed in seeds:
        print(f"seed {seed}:", flush=True)
        runs.append(_one_seed([*args, f"seed={seed}"]))
    ok = all(r["asha_pass"] and r["pbt_pass"] for r in runs)
    report = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "overrides": args,
              "seeds": seeds, "runs": runs,
              "criteria": {"max_eval_loss_gap": MAX_LOSS_GAP, "max_steps_ratio": MAX_STEPS_RATIO,
                           "pbt": "best eval_loss below the grid's, steps at most the grid's"},
              "pass": ok}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"search-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
