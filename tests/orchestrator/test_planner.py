"""The planner: trials that can share a base share packs, packs fill workers, plans are stable."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.config.schema import Config, QuantCfg, SweepDef, TrainCfg
from orchestrator.planner import plan
from orchestrator.search.expand import expand


def _trials(n: int, **sections) -> list:
    """n distinct trials (r = 1..n) of a config with `sections` replaced (e.g. quant=QuantCfg())."""
    cfg = dataclasses.replace(Config(), **sections)
    cfg = dataclasses.replace(cfg, sweep=SweepDef(name="t", params={"lora.r": list(range(1, n + 1))}))
    return expand(cfg)


def _sizes(packs) -> list[int]:
    return [len(p.trials) for p in packs]


@pytest.mark.parametrize(
    ("n", "max_adapters", "num_workers", "sizes"),
    [
        (8, 4, 2, [4, 4]),  # full packs already keep both workers busy
        (8, 4, 4, [2, 2, 2, 2]),  # smaller packs rather than idle workers
        (8, 4, 1, [4, 4]),  # one worker: never more than max_adapters in a pack
        (10, 4, 2, [4, 3, 3]),  # balanced, not 4 + 4 + 2
        (3, 4, 8, [1, 1, 1]),  # at most one pack per trial
        (5, 1, 2, [1, 1, 1, 1, 1]),  # max_adapters=1: one run per worker
        (7, 3, 3, [3, 2, 2]),
    ],
)
def test_pack_count_and_balance(n, max_adapters, num_workers, sizes):
    trials = _trials(n)
    packs = plan(trials, max_adapters, num_workers)
    assert _sizes(packs) == sizes
    # Every trial exactly once, in the order given.
    assert [t.trial_id for p in packs for t in p.trials] == [t.trial_id for t in trials]


def test_trials_are_grouped_by_base_and_seq_len():
    nf4 = _trials(3)
    fp4 = _trials(2, quant=QuantCfg(type="fp4"))
    long = _trials(2, train=TrainCfg(seq_len=512))
    no_ckpt = _trials(2, train=TrainCfg(gradient_checkpointing=False))
    mixed = [nf4[0], fp4[0], long[0], nf4[1], no_ckpt[0], fp4[1], nf4[2], long[1], no_ckpt[1]]

    packs = plan(mixed, max_adapters=4, num_workers=1)

    assert len(packs) == 4  # one per (weights, memory options, seq_len); each group fits in one
    for pack in packs:
        assert {t.base for t in pack.trials} == {pack.base}
        assert len({t.spec.data.seq_len for t in pack.trials}) == 1
    # Groups come in the order of their first trial; within a group the order is kept.
    assert [[t.trial_id for t in p.trials] for p in packs] == [
        [nf4[0].trial_id, nf4[1].trial_id, nf4[2].trial_id],
        [fp4[0].trial_id, fp4[1].trial_id],
        [long[0].trial_id, long[1].trial_id],
        [no_ckpt[0].trial_id, no_ckpt[1].trial_id],
    ]


def test_plan_is_deterministic_and_ids_are_unique():
    trials = _trials(9)
    first = plan(trials, max_adapters=2, num_workers=3)
    again = plan(list(trials), max_adapters=2, num_workers=3)
    assert [p.pack_id for p in first] == [p.pack_id for p in again]
    assert len({p.pack_id for p in first}) == len(first)
    # The id names its content: another split of the same trials gives other ids.
    other = plan(trials, max_adapters=3, num_workers=3)
    assert {p.pack_id for p in other}.isdisjoint({p.pack_id for p in first})


def test_empty_and_invalid():
    assert plan([], max_adapters=4, num_workers=2) == []
    with pytest.raises(ValueError, match="max_adapters"):
        plan(_trials(2), max_adapters=0, num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        plan(_trials(2), max_adapters=1, num_workers=0)
