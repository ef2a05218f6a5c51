"""Orchestration overhead: the share of a sweep's wall time not spent training.

Runs `python -m orchestrator` as a user would (a subprocess in a scratch folder: Python start,
config validation, Ray start, MLflow store, scheduling, recording) and reads back the sweep's
`summary.json`, where each pack has the start and end time of its worker's `run_pack` (base load
included, which is training work a one-run-per-GPU script pays too). Then:

    busy     = the longest total time any one worker spent inside run_pack
    overhead = 1 - busy / wall        (what a perfect scheduler with no setup would save)

also split into startup (command start to the first pack's start) and finish (last pack's end to
the command's exit: recording, summary, Ray shutdown).

    python -m bench.orchestration [hydra overrides...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def measure(overrides: list[str], sweep: str = "rank_grid") -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "orchestrator", f"sweep={sweep}",
                               *overrides], cwd=tmp, env=env, capture_output=True, text=True)
        t1 = time.time()
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        summary = json.loads((Path(tmp) / "outputs" / sweep / "latest" / "summary.json").read_text())
    packs = {}
    for row in summary["trials"]:
        packs[row["pack_id"]] = (row["placement"]["pid"], row["pack_started"], row["pack_ended"])
    busy: dict[int, float] = defaultdict(float)
    for pid, start, end in packs.values():
        busy[pid] += end - start
    wall = t1 - t0
    first = min(s for _, s, _ in packs.values())
    last = max(e for _, _, e in packs.values())
    return {"sweep": sweep, "overrides": overrides, "wall_s": wall, "trials": len(summary["trials"]),
            "packs": len(packs), "workers": len(busy), "busy_s": max(busy.values()),
            "overhead": 1 - max(busy.values()) / wall, "startup_s": first - t0,
            "finish_s": t1 - last}


def main(argv: list[str] | None = None) -> int:
    result = measure(list(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
