"""Successive halving against the grid: the same 12 trials, the best eval loss and the steps paid.

Runs `python -m orchestrator sweep=grid` and `python -m orchestrator sweep=asha` as a user would
(each a subprocess in its own scratch folder, MLflow store included), with the same overrides,
and reads back each sweep's `summary.json` (`search`: the best trial's final eval_loss and the
optimizer steps trained). The two sweeps hold the same trials (same ids, so the same numbers for
every step both train); ASHA stops the worse ones at its rungs and backfills their slots.

    python -m bench.search                          # the defaults: tiny model, bundled data
    python -m bench.search train.max_steps=120      # any Hydra overrides, given to both sweeps

Prints both figures and their ratios; writes bench/results/search-<date>-<time>.json. The
acceptance it measures: ASHA's best within 2% of the grid's, for at most half its steps.
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


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    print(f"ASHA vs grid on {_machine()}: the same trials, overrides {overrides or 'none'}",
          flush=True)
    grid = run("grid", overrides)
    print(f"  grid: best eval_loss {grid['best_eval_loss']:.4f} ({grid['best_trial']}), "
          f"{grid['training_steps']} training steps, {grid['wall_s']:.0f}s", flush=True)
    asha = run("asha", overrides)
    print(f"  asha: best eval_loss {asha['best_eval_loss']:.4f} ({asha['best_trial']}), "
          f"{asha['training_steps']} training steps, {asha['wall_s']:.0f}s "
          f"({asha['stopped_early']} of {asha['trials']} stopped early)", flush=True)
    gap = asha["best_eval_loss"] / grid["best_eval_loss"] - 1
    steps = asha["training_steps"] / grid["training_steps"]
    ok = gap <= MAX_LOSS_GAP and steps <= MAX_STEPS_RATIO
    print(f"  asha/grid: eval_loss x{1 + gap:.4f} ({gap:+.2%}; at most +{MAX_LOSS_GAP:.0%}), "
          f"steps x{steps:.3f} (at most x{MAX_STEPS_RATIO}), wall x{asha['wall_s'] / grid['wall_s']:.2f}"
          f"  -> {'PASS' if ok else 'FAIL'}", flush=True)
    report = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "overrides": overrides,
              "grid": grid, "asha": asha, "eval_loss_ratio": 1 + gap, "eval_loss_gap": gap,
              "steps_ratio": steps, "wall_ratio": asha["wall_s"] / grid["wall_s"],
              "criteria": {"max_eval_loss_gap": MAX_LOSS_GAP, "max_steps_ratio": MAX_STEPS_RATIO},
              "pass": ok}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"search-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
