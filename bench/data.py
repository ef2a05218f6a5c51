"""`python -m bench.data`: the data path at real size, beside the path it replaced.

    python -m bench.data                          # 50 k, 500 k and 2 M rows, 3 runs each
    python -m bench.data --rows 20000 --runs 1    # a smoke run

For each size, a generated Alpaca-shaped JSONL file (instruction 6-30 words, an input of 6-60
words on half the rows, an output of 6-150 words; ~0.7 KB a row, as the issue's file) is
tokenized with the tiny model's tokenizer at seq_len 512. Every run is a fresh cache and fresh
processes:

    first   what a first sweep does before training: the preflight's check (which writes the
            validated records) and `load_data` (tokenize with Dataset.map, split): wall time,
            peak RSS of the process and its tokenizing children
    ready   what a second sweep does: the check and `load_data` again, in a new process, from
            the cache: wall time ("data ready")
    train   a training worker: load the base, open the data, train one adapter 20 steps (micro
            batch 4): peak RSS, and what RSS (and RssAnon, its own memory without the pages of
            mapped files) grew by when the data was opened
    legacy  the path before (bench/legacy_data.py: the whole file read, lists of ints, a JSON
            cache every worker reads back), first and reload, where it fits (--legacy-up-to)

Figures: the median of the runs with min and max. Sizes: the file, the records and the tokens.
Results go to bench/results/data-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
         "case point government company number group problem fact be have do say get make go "
         "know take see come think look want give use find tell ask seem feel try leave call good "
         "new first last long great little own other old right big high different small large "
         "next early young important few public bad same able to of in for on with at by from up "
         "about into over after beneath under above the and a that I it not he as you this but "
         "his they her she or an will my one all would there their what so out if who which go "
         "me when can like no just him people your some could them than then now only its also "
         "back after use two how our well even because any these most us river stone garden "
         "window letter music answer question village morning evening winter summer").split()


def generate(path: Path, n: int, seed: int = 0) -> Path:
    """n Alpaca-shaped rows (deterministic for n and seed); reused when already written."""
    if path.exists():
        return path
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as f:
        for _ in range(n):
            row = {"instruction": text(6, 30), "input": text(6, 60) if rng.random() < 0.5 else "",
                   "output": text(6, 150)}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


# -- the measured steps, each run in a process of its own ----------------------------------------

def _peak_mib() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its own part alone (RssAnon: without the pages
    of mapped files, which the page cache shares between processes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _step(kind: str, path: str, seq_len: int) -> dict:
    from qlora.config import DataSpec
    from qlora.tiny import build_tokenizer

    spec = DataSpec(path=path, seq_len=seq_len)
    tok = build_tokenizer()
    if kind in ("first", "ready"):
        from qlora.data import load_data, validate_data_file

        start = time.perf_counter()
        validate_data_file(path)
        data = load_data(spec, tok)
        wall = time.perf_counter() - start
        return {"wall_s": wall, "peak_MiB": _peak_mib(), "n_train": len(data.train),
                "n_eval": len(data.eval)}
    if kind in ("legacy_first", "legacy_reload"):
        from bench import legacy_data

        start = time.perf_counter()
        data = legacy_data.load_data(spec, tok)
        return {"wall_s": time.perf_counter() - start, "peak_MiB": _peak_mib(),
                "n_train": len(data.train)}
    if kind in ("train", "legacy_train"):
        from qlora import BaseSpec, TrialSpec, load_base, train_pack

        base = load_base(BaseSpec(compute_dtype="float32"), device="cpu")
        before, anon = _rss_mib(), _rss_mib("RssAnon")
        if kind == "train":
            from qlora.data import load_data
        else:
            from bench.legacy_data import load_data
        data = load_data(spec, tok)
        opened, opened_anon = _rss_mib(), _rss_mib("RssAnon")
        trial = TrialSpec(trial_id="bench", max_steps=20, micro_batch_size=4, eval_every=0,
                          data=spec)
        start = time.perf_counter()
        [result] = train_pack(base, [trial], datasets={spec: data})
        return {"wall_s": time.perf_counter() - start, "peak_MiB": _peak_mib(),
                "data_MiB": opened - before, "data_anon_MiB": opened_anon - anon,
                "status": str(result.status)}
    raise ValueError(kind)


def _run_step(kind: str, path: Path, cache: Path, seq_len: int) -> dict:
    env = {**os.environ, "QLORA_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(cache / "hf")}
    done = subprocess.run([sys.executable, "-m", "bench.data", "--step", kind, str(path),
                           str(seq_len)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{kind} on {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size_mib(folder: Path, pattern: str) -> float:
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file()) / 2**20


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def measure(n: int, runs: int, legacy_up_to: int, seq_len: int, scratch: Path) -> dict:
    path = generate(scratch / f"alpaca-{n}.jsonl", n)
    row: dict = {"rows": n, "file_MiB": path.stat().st_size / 2**20}
    got: dict[str, list[dict]] = {}
    for _ in range(runs):
        cache = Path(tempfile.mkdtemp(prefix="bench-data-", dir=scratch))
        try:
            for kind in ("first", "ready", "train"):
                got.setdefault(kind, []).append(_run_step(kind, path, cache, seq_len))
            row["records_MiB"] = _size_mib(cache / "data" / "records", "*/*.arrow")
            row["tokens_MiB"] = _size_mib(cache / "data", "*/*.arrow")
            if n <= legacy_up_to:
                for kind in ("legacy_first", "legacy_reload", "legacy_train"):
                    got.setdefault(kind, []).append(_run_step(kind, path, cache, seq_len))
                row["legacy_cache_MiB"] = _size_mib(cache / "data", "*.json")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    for kind, results in got.items():
        for field in ("wall_s", "peak_MiB", "data_MiB", "data_anon_MiB"):
            if field in results[0]:
                row[f"{kind}_{field}"] = _stats([r[field] for r in results])
    row["n_train"] = got["first"][0]["n_train"]
    return row


def _show(row: dict) -> None:
    def fig(key: str, unit: str) -> str:
        s = row.get(key)
        if s is None:
            return "-"
        return f"{s['median']:.1f}{unit} [{s['min']:.1f}-{s['max']:.1f}]"

    print(f"  {row['rows']:>9,} rows, file {row['file_MiB']:.0f} MiB, records "
          f"{row.get('records_MiB', 0):.0f} MiB, tokens {row.get('tokens_MiB', 0):.0f} MiB\n"
          f"    first   {fig('first_wall_s', 's')}, peak {fig('first_peak_MiB', ' MiB')}\n"
          f"    ready   {fig('ready_wall_s', 's')}\n"
          f"    train   peak {fig('train_peak_MiB', ' MiB')}, data opened "
          f"{fig('train_data_MiB', ' MiB')} (its own memory: "
          f"{fig('train_data_anon_MiB', ' MiB')})\n"
          f"    legacy  first {fig('legacy_first_wall_s', 's')} peak "
          f"{fig('legacy_first_peak_MiB', ' MiB')}; reload {fig('legacy_reload_wall_s', 's')} "
          f"peak {fig('legacy_reload_peak_MiB', ' MiB')}; train peak "
          f"{fig('legacy_train_peak_MiB', ' MiB')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--rows", default="50000,500000,2000000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--legacy-up-to", type=int, default=50_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--scratch", default=str(Path(__file__).resolve().parents[1] / ".cache"
                                                 / "bench-data"))
    parser.add_argument("--step", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        kind, path, seq_len = args.step
        print(json.dumps(_step(kind, path, int(seq_len))))
        return 0
    import platform

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"bench.data: {platform.machine()} {os.cpu_count()} cores, {started}, commit {commit}, "
          f"{args.runs} run(s) each, seq_len {args.seq_len}", flush=True)
    rows = []
    for n in (int(x) for x in args.rows.split(",")):
        rows.append(measure(n, args.runs, args.legacy_up_to, args.seq_len, scratch))
        _show(rows[-1])
    small, big = rows[0], rows[-1]
    if len(rows) > 1:
        growth = big["train_peak_MiB"]["median"] - small["train_peak_MiB"]["median"]
        print(f"  worker peak RSS growth {small['rows']:,} -> {big['rows']:,} rows: "
              f"{growth:+.0f} MiB (target < 200)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores",
                               "date": started, "commit": commit, "runs": args.runs,
                               "rows": rows}, indent=2))
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
