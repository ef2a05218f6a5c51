"""Quantization and LoRA init as sweep dimensions: one sweep, one table of what each costs.

`quant.type x lora.init` on the tiny model: each storage type is a base of its own (the planner
packs by base), LoftQ and Gaussian trials of one base share its pack, LoftQ on the 16-bit base is
left out with a line saying why, and every trial's run records its storage type, init, measured
bits per weight and peak memory beside its eval loss.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from support import tiny_sweeps

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import SweepDef
from orchestrator.search.expand import expand, skipped
from orchestrator.tracking.keys import (
    BITS_METRIC,
    EVAL_LOSS,
    MEMORY_PEAK_METRIC,
    NOTE_TAG,
    PACK_TAG,
    RUNS_VIEW_TAG,
)

GRID = {"quant.type": ["nf4", "int8", "none"], "lora.init": ["gaussian", "loftq"]}
#: Storage of the tiny model's linears, as bitsandbytes holds them (see test_engine's table).
BITS = {"nf4": 4 + 8 / 64 + 32 / (64 * 256), "int8": 8.0, "none": 32.0}


def _config(root, params=GRID, name="quant_t"):
    cfg = tiny_sweeps.config(root, SweepDef(name=name, params=dict(params)), max_adapters=4,
                             num_workers=1)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4, eval_every=0),
                               eval=dataclasses.replace(cfg.eval, num_samples=0))


def test_loftq_on_a_16_bit_base_is_left_out_and_said(tmp_path):
    from orchestrator.config.validate import validate

    cfg = validate(dataclasses.asdict(_config(tmp_path)))
    trials = expand(cfg)
    assert sorted((t.base.quant_type, t.spec.init) for t in trials) == [
        ("int8", "gaussian"), ("int8", "loftq"), ("nf4", "gaussian"), ("nf4", "loftq"),
        ("none", "gaussian")]
    [line] = skipped(cfg)
    assert line.startswith("quant.type=none, lora.init=loftq: loftq needs a quantized base")
    # Nothing left to train is an error before anything starts.
    only = validate(dataclasses.asdict(_config(tmp_path, {"lora.init": ["loftq"]})))
    only = dataclasses.replace(only, quant=dataclasses.replace(only.quant, type="none"))
    with pytest.raises(ConfigError, match="sweep.params: no combination can train"):
        expand(only)


@pytest.mark.slow
def test_a_sweep_over_quant_type_and_lora_init_records_each(ray_session, tmp_path):
    run = tiny_sweeps.run(tmp_path, _config(tmp_path))
    assert run.exit_code == 0
    assert len(run.children) == 5
    assert tiny_sweeps.assert_params_are_what_ran(run) == 5
    rows = run.rows()
    packs: dict[str, list] = {}
    for tid, child in run.children.items():
        params, metrics, row = child.data.params, child.data.metrics, rows[tid]
        quant, init = params["quant_type"], params["lora_init"]
        assert (row["quant_type"], row["lora_init"]) == (quant, init)
        assert child.info.run_name.endswith(f"-{quant}-{init}")
        assert metrics[BITS_METRIC] == pytest.approx(BITS[quant], rel=1e-6)
        assert row["base_bits_per_weight"] == pytest.approx(BITS[quant], rel=1e-6)
        assert metrics[MEMORY_PEAK_METRIC] > 1 and row["memory_peak_mib"] == metrics[
            MEMORY_PEAK_METRIC]
        packs.setdefault(child.data.tags[PACK_TAG], []).append(quant)
    # One base per storage type: no pack mixes two, and each type's trials share one pack.
    assert sorted(map(sorted, packs.values())) == [["int8", "int8"], ["nf4", "nf4"], ["none"]]
    # LoftQ starts elsewhere than PEFT's init on the same base, so it trains to another loss.
    by = {(c.data.params["quant_type"], c.data.params["lora_init"]): c.data.metrics[EVAL_LOSS]
          for c in run.children.values()}
    assert abs(by["nf4", "loftq"] - by["nf4", "gaussian"]) > 1e-3
    # The leaderboard and the runs view show storage, bits and peak beside the eval loss.
    board = run.parent.data.tags[NOTE_TAG]
    assert "| quant | bits/w | peak MiB |" in board and "| nf4+loftq | 4.13 |" in board
    exp = run.client.get_experiment(run.parent.info.experiment_id)
    view = json.loads(exp.tags[RUNS_VIEW_TAG])
    assert {"params.`quant_type`", "params.`lora_init`", f"metrics.`{BITS_METRIC}`",
            f"metrics.`{MEMORY_PEAK_METRIC}`"} <= set(view["selectedColumns"])
