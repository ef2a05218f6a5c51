"""Where one adapter's step goes, this engine beside the standard recipe (K=1, steps 2..N).

    python -m bench.profile_one [--shape wide] [--kind text] [--steps 12]

Each side runs in a fresh process (`bench.engine`'s setup, the same data and trial); the
profiler (torch.profiler, CPU) is on from the end of step 1 to the end of step N, so loads,
data opening and the final evaluation are left out on both sides. Prints, per step, the ops
that take the most self time on either side, and the total.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.engine import run_case

TOP = 12


def _table(prof, steps: int) -> dict:
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def side_engine(args: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bench.engine import _setup
    from qlora import load_base, train_pack

    spec, trials = _setup({**args, "k": 1})
    base = load_base(spec)
    prof = profile(activities=[ProfilerActivity.CPU])
    seen = []

    def on_metrics(trial_id, step, metrics):
        if "train_loss" not in metrics:
            return None
        seen.append(time.perf_counter())
        if len(seen) == 1:
            prof.start()
        elif len(seen) == args["steps"]:
            prof.stop()
        return None

    train_pack(base, trials[:1], on_metrics=on_metrics)
    return {"ms": _table(prof, args["steps"] - 1),
            "wall_ms": (seen[-1] - seen[0]) * 1e3 / (args["steps"] - 1)}


def side_recipe(args: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bench.engine import _setup, recipe_steps

    spec, trials = _setup({**args, "k": 1})
    prof = profile(activities=[ProfilerActivity.CPU])
    _, _, _, marks = recipe_steps(spec, trials[0],
                                  after_step=lambda step: step == 0 and prof.start())
    prof.stop()
    return {"ms": _table(prof, args["steps"] - 1),
            "wall_ms": (marks[-1] - marks[0]) * 1e3 / (args["steps"] - 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_one", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wide")
    parser.add_argument("--kind", default="text")
    parser.add_argument("--steps", type=int, default=12)
    opts = parser.parse_args(argv)
    args = {"model": opts.shape, "kind": opts.kind, "dtype": "float32", "seq_len": 128,
            "micro_batch": 2, "steps": opts.steps}
    ours, theirs = (run_case(side, args, "bench.profile_one") for side in ("engine", "recipe"))
    print(f"K=1, {opts.shape}, {opts.kind}, steps 2..{opts.steps}: engine "
          f"{ours['wall_ms']:.0f} ms/step, recipe {theirs['wall_ms']:.0f} ms/step "
          f"(x{ours['wall_ms'] / theirs['wall_ms']:.2f})")
    keys = sorted(set(ours["ms"]) | set(theirs["ms"]),
                  key=lambda k: -max(ours["ms"].get(k, 0), theirs["ms"].get(k, 0)))[:TOP]
    print(f"  {'op (self CPU time per step)':44s} {'engine':>9s} {'recipe':>9s}")
    for k in keys:
        print(f"  {k[:44]:44s} {ours['ms'].get(k, 0):7.1f}ms {theirs['ms'].get(k, 0):7.1f}ms")
    print(f"  {'all ops':44s} {sum(ours['ms'].values()):7.1f}ms "
          f"{sum(theirs['ms'].values()):7.1f}ms")
    return 0


SIDES = {"engine": side_engine, "recipe": side_recipe}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in SIDES:  # one side, in its own process (run_case)
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(SIDES[sys.argv[1]](json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
