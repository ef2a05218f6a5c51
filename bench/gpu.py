"""GPU benchmark: a Llama-3-8B-shaped model with random weights (speed and memory do not depend
on the values), engine only: torch, transformers, peft, bitsandbytes. No Ray, no MLflow.

    python -m bench.gpu                      # on a GPU machine: the 8B shape
    python -m bench.gpu --shape tiny --steps 3   # the same code path on a CPU, for a check

Rows, each measured in this run:
- bf16 matmul rate of this GPU (8192^3 matmuls): the denominator of MFU.
- One adapter, seq_len 512 and 2048, micro-batch 1 and 4: step time, tokens/s, peak memory, MFU.
  FLOPs per token = 6 N + attention: forward 2N, backward 2N (input gradients only: the base is
  frozen; the adapters' weight gradients are negligible), and 2N for the forward that gradient
  checkpointing recomputes; N = parameters of the linears (lm_head included).
- The same step with the standard recipe (transformers + peft + bitsandbytes): ratio of step times
  and of peak memory.
- 8 adapters packed on one base vs 8 runs of the standard recipe one after another, each loading
  its own base: wall-time ratio (loads included) and peak memory vs the sum of 8 separate runs.
Results go to bench/results/gpu-*.json; copy the table into BENCHMARKS.md with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # Llama-3-8B: the published config's shape.
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                 max_position_embeddings=4096),
}


def build_random_model(shape: str, folder: Path) -> Path:
    """Save a model of `shape` with random bf16 weights to `folder` (once), with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.tiny import build_tokenizer

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)  # ids only matter; random token ids are fed
    del model
    return folder


def _examples(n: int, seq_len: int, vocab: int, seed: int):
    import torch

    from qlora.data import Example

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq_len,), generator=gen).tolist()
        out.append(Example(ids, [-100] * 8 + ids[8:]))
    return out


def matmul_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        a = torch.randn(512, 512)
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        return 10 * 2 * 512**3 / (time.perf_counter() - t) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def case(args: dict) -> dict:
    """One measurement in this process: engine K adapters, or the standard recipe."""
    import torch

    from qlora import BaseSpec, DataSpec, TrialSpec, load_base, train_pack

    path, seq, mb, steps, k = args["path"], args["seq_len"], args["mb"], args["steps"], args["k"]
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    data_spec = DataSpec(seq_len=seq, max_eval_examples=1)
    t0 = time.perf_counter()
    if args["kind"] == "recipe":
        result = _recipe(path, seq, mb, steps, args["sequential"], dtype)
    else:
        spec = BaseSpec(name_or_path=path, compute_dtype=dtype, gradient_checkpointing=True)
        base = load_base(spec)
        vocab = base.model.config.vocab_size
        data = {data_spec: _Data(_examples(64, seq, vocab, 0), _examples(1, seq, vocab, 1))}
        trials = [TrialSpec(trial_id=f"k{i}", seed=i, r=16, alpha=32.0, learning_rate=1e-4,
                            max_steps=steps, micro_batch_size=mb, data=data_spec)
                  for i in range(k)]
        marks = []
        t_train = time.perf_counter()
        train_pack(base, trials, datasets=data,
                   on_metrics=lambda t, s, m: "train_loss" in m and marks.append(time.perf_counter()) and None)
        # K marks per step (one per adapter): time from the end of step 1 to the end of the last.
        step_s = (marks[-1] - marks[k - 1]) / max(1, steps - 1) if steps > 1 else \
            (time.perf_counter() - t_train) / steps
        result = {"step_s": step_s}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        result["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    result["wall_s"] = time.perf_counter() - t0
    return result


class _Data:
    def __init__(self, train, eval_):
        self.train, self.eval = train, eval_


def _recipe(path: str, seq: int, mb: int, steps: int, runs: int, dtype: str) -> dict:
    """The standard QLoRA recipe, `runs` times one after another, each loading its own base."""
    import gc

    import torch

    from .engine import standard_recipe

    cuda = torch.cuda.is_available()
    step_times = []
    for run in range(runs):
        model, params, opt = standard_recipe(path, dtype, r=16, alpha=32.0, lr=1e-4)
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(run)
        model.train()
        for step in range(steps):
            if step == 1:
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
            ids = torch.randint(3, model.config.vocab_size, (mb, seq), generator=gen).to(device)
            labels = ids.clone()
            labels[:, :8] = -100
            model(input_ids=ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_times.append((time.perf_counter() - t) / max(1, steps - 1))
        del model, opt, params
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"step_s": sum(step_times) / len(step_times)}


def _run(args: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--case", json.dumps(args)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def linear_params(path: str) -> int:
    from qlora.memory import model_shapes

    shapes = model_shapes(path)
    lin = sum(i * o for i, o in shapes["linears"].values())
    return lin + shapes["hidden"] * shapes["vocab"]  # + lm_head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--shape", default="llama3_8b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--folder", default=os.environ.get("BENCH_MODEL_DIR", "/tmp/bench-model"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.case:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(case(json.loads(opts.case))))
        return 0
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    path = str(build_random_model(opts.shape, Path(opts.folder) / opts.shape))
    n = linear_params(path)
    peak = matmul_tflops()
    print(f"{device}: {opts.shape} shape, {n / 1e9:.2f} B linear params; "
          f"measured bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    rows = []
    seqs = (512, 2048) if opts.shape != "tiny" else (64, 128)
    for seq in seqs:
        for mb in (1, 4):
            common = {"path": path, "seq_len": seq, "mb": mb, "steps": opts.steps}
            ours = _run({**common, "kind": "engine", "k": 1})
            theirs = _run({**common, "kind": "recipe", "sequential": 1, "k": 1})
            tokens = seq * mb
            flops = 6 * n * tokens  # + attention, small next to 6N at these lengths
            row = {"seq_len": seq, "micro_batch": mb, "engine_step_s": ours["step_s"],
                   "recipe_step_s": theirs["step_s"], "step_ratio": ours["step_s"] /
                   theirs["step_s"], "tokens_per_s": tokens / ours["step_s"],
                   "mfu": flops / ours["step_s"] / (peak * 1e12),
                   "engine_peak_GiB": ours.get("peak_bytes", 0) / 2**30,
                   "recipe_peak_GiB": theirs.get("peak_bytes", 0) / 2**30}
            row["peak_ratio"] = (row["engine_peak_GiB"] / row["recipe_peak_GiB"]
                                 if row["recipe_peak_GiB"] else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    common = {"path": path, "seq_len": seqs[0], "mb": 1, "steps": opts.steps}
    packed = _run({**common, "kind": "engine", "k": 8})
    single = _run({**common, "kind": "recipe", "sequential": 1, "k": 1})
    seq8 = _run({**common, "kind": "recipe", "sequential": 8, "k": 1})
    pack_row = {"packed8_wall_s": packed["wall_s"], "sequential8_wall_s": seq8["wall_s"],
                "wall_ratio": packed["wall_s"] / seq8["wall_s"],
                "packed8_peak_GiB": packed.get("peak_bytes", 0) / 2**30,
                "sum_of_8_separate_GiB": 8 * single.get("peak_bytes", 0) / 2**30}
    if single.get("peak_bytes"):
        pack_row["peak_ratio_vs_sum"] = packed["peak_bytes"] / (8 * single["peak_bytes"])
    print(json.dumps(pack_row), flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    target = out / f"gpu-{opts.shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps({"device": device, "shape": opts.shape, "matmul_tflops": peak,
                                  "rows": rows, "packing": pack_row}, indent=2))
    print(f"results: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
