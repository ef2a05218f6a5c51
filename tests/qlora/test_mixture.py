"""Data loaded through `datasets` and mixtures of sources, in training: packed equals alone on both,
a mixture draws its sources by weight with a stream that depends on the trial's seed alone, and
reports an eval loss per source beside the overall one."""

from __future__ import annotations

import json

import pytest
from support.engine import by_id, curve, make_base, max_rel

from qlora import TrialSpec, train_pack
from qlora import data as qdata
from qlora.config import DataSpec, mix_error, mix_sources
from qlora.data import load_data
from qlora.mixture import MixStream


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    alpaca = folder / "echo.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Echo {i} twice.", "output": f"{i} {i}"})
                              + "\n" for i in range(60)))
    text = folder / "count.csv"
    text.write_text("text\n" + "".join(f"one {i} two {i + 1} three {i + 2}\n" for i in range(40)))
    return alpaca, text


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    qdata._MEMORY.clear()
    yield
    qdata._MEMORY.clear()


def _mix(alpaca, text) -> DataSpec:
    return DataSpec(seq_len=48, max_eval_examples=8, mix=mix_sources(
        [{"path": str(alpaca), "weight": 3.0}, {"path": str(text), "label": "counting"}]))


def _trials(data: DataSpec) -> list[TrialSpec]:
    return [TrialSpec(trial_id=f"m{k}", seed=10 + k, r=r, alpha=2.0 * r, learning_rate=lr,
                      micro_batch_size=2, max_steps=6, eval_every=3, data=data)
            for k, (r, lr) in enumerate([(4, 2e-3), (8, 1e-3), (2, 3e-3)])]


@pytest.mark.parametrize("kind", ["datasets-file", "mixture"])
def test_packed_equals_alone(kind, files):
    data = DataSpec(path=str(files[0]), seq_len=48, max_eval_examples=8) if kind == "datasets-file" \
        else _mix(*files)
    base = make_base(gc=False)
    trials = _trials(data)
    packed = by_id(train_pack(base, trials))
    for trial in trials:
        alone = train_pack(base, [trial])[0]
        assert packed[trial.trial_id].status == alone.status == "finished"
        assert max_rel(curve(packed[trial.trial_id]), curve(alone)) <= 1e-4
        if kind == "mixture":  # per source, and the same alone as packed
            got, ref = packed[trial.trial_id].eval_metrics, alone.eval_metrics
            assert set(got) >= {"eval_loss", "eval_loss_echo", "eval_loss_counting"}
            assert abs(got["eval_loss_counting"] - ref["eval_loss_counting"]) <= 1e-4 * abs(
                ref["eval_loss_counting"])
            low, high = sorted([got["eval_loss_echo"], got["eval_loss_counting"]])
            assert low < got["eval_loss"] < high  # the overall loss weighs both sources' tokens
    if kind == "mixture":
        info = packed["m0"].data
        assert (info["format"], info["share_echo"], info["share_counting"]) == ("mix", 0.75, 0.25)


def test_a_mixture_draws_by_weight_and_resumes_its_stream(files):
    data = load_data(_mix(*files), _tokenizer())
    assert [p[0] for p in data.parts] == ["echo", "counting"]
    n_echo = data.parts[0][2]
    sizes, shares = [p[2] for p in data.parts], [p[1] for p in data.parts]
    stream = MixStream(sizes, shares, 4, seed=5)
    drawn = [i for _ in range(300) for i in stream.next_indices()]
    assert 0.70 < sum(i < n_echo for i in drawn) / len(drawn) < 0.80  # weight 3 of 4
    assert MixStream(sizes, shares, 4, seed=6).next_indices() != MixStream(
        sizes, shares, 4, seed=5).next_indices()  # the seed decides the stream...
    position = stream.position()  # ...and (epoch, offset) continues it exactly
    again = MixStream(sizes, shares, 4, seed=5, **position)
    assert [again.next_indices() for _ in range(50)] == [stream.next_indices() for _ in range(50)]
    assert position["epoch"] >= 1  # past an epoch: every source's order was drawn again


def _tokenizer():
    from qlora.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize(("mix", "why"), [
    ([{"path": "a.jsonl"}], "a list of 2 or more sources"),
    ([{"path": "a.jsonl"}, {"weight": 2}], "entry 1 has no path"),
    ([{"path": "a.jsonl", "weight": 0}, {"path": "b.jsonl"}], "entry 0: weight must be"),
    ([{"path": "a.jsonl", "wieght": 2}, {"path": "b.jsonl"}], "entry 0: unknown key 'wieght'"),
    ([{"path": "x/a.jsonl"}, {"path": "y/a.csv"}], "two sources share the label 'a'"),
])
def test_a_bad_mixture_is_named(mix, why):
    assert why in mix_error(mix)
