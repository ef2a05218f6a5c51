"""`sweep.objective` and `sweep.mode` decide the leaderboard and the champion; samples are logged.

Two trials on two tiny tasks whose eval loss and exact match disagree: `yes` (80% "Say yes." ->
"yes", 20% 60 random letters) answers exactly most of the time but its loss is dominated by the
noise; `coin` (one of four letters at random) has a low loss and rarely answers exactly. The same
sweep (same seed, so the same trials and numbers) runs with the default objective and with
`sweep.objective=eval_exact_match sweep.mode=max`, each registering its champion.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from support import tiny_sweeps

from orchestrator.config.schema import DataCfg, EvalCfg, LoraCfg, SweepDef, TrainCfg
from orchestrator.tracking.keys import CHAMPION_ALIAS, NOTE_TAG, samples_file

USER = "tests.support.user_metric:shared_chars"  # importable from the repository root, as Ray's workers see it


def _write_tasks(root):
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    paths = {name: root / f"{name}.jsonl" for name in ("yes", "coin")}
    with open(paths["yes"], "w") as f:
        for _ in range(200):
            out = "yes" if rng.random() < 0.8 else "".join(rng.choice(letters) for _ in range(60))
            prompt = "Say yes." if out == "yes" else "Type noise."
            f.write(json.dumps({"instruction": prompt, "input": "", "output": out}) + "\n")
    with open(paths["coin"], "w") as f:
        for _ in range(200):
            f.write(json.dumps({"instruction": "Pick a letter.", "input": "",
                                "output": rng.choice("abcd")}) + "\n")
    return paths


def _sweep(root, paths, **objective):
    sweep = SweepDef(name="judge", params={"data.path": [str(paths["yes"]), str(paths["coin"])]},
                     **objective)
    cfg = tiny_sweeps.config(root, sweep, register_as="judged")
    cfg = dataclasses.replace(
        cfg, lora=LoraCfg(r=8, alpha=16.0),
        train=TrainCfg(max_steps=30, learning_rate=1e-2, seq_len=96, micro_batch_size=4,
                       optimizer="adamw", eval_every=15),
        data=DataCfg(eval_fraction=0.2, max_eval_examples=40),
        eval=EvalCfg(num_samples=16, max_new_tokens=4, metric=USER))
    return tiny_sweeps.run(root, cfg)


def _leaderboard(run) -> list[str]:
    """Trial names in the order of the parent run's description (its markdown table)."""
    rows = [line for line in run.parent.data.tags[NOTE_TAG].splitlines()
            if line.startswith("| ") and not line.startswith("| #")]
    return [line.split(" | ")[1] for line in rows]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    paths = _write_tasks(tmp_path_factory.mktemp("tasks"))
    by_loss = _sweep(tmp_path_factory.mktemp("by_loss"), paths)
    by_em = _sweep(tmp_path_factory.mktemp("by_em"), paths, objective="eval_exact_match",
                   mode="max")
    return by_loss, by_em


@pytest.mark.slow
def test_objective_orders_the_leaderboard_and_picks_the_champion(runs):
    by_loss, by_em = runs
    for run in runs:
        assert run.exit_code == 0
    rows = {r["name"]: r for r in by_loss.summary["trials"]}
    # The same trials gave the same numbers in both sweeps (one seed).
    for r in by_em.summary["trials"]:
        assert r["eval_loss"] == pytest.approx(rows[r["name"]]["eval_loss"], rel=1e-6)
        assert r["eval_metrics"] == pytest.approx(rows[r["name"]]["eval_metrics"], rel=1e-6)
    loss_order = sorted(rows, key=lambda n: rows[n]["eval_loss"])
    em_order = sorted(rows, key=lambda n: -rows[n]["eval_metrics"]["eval_exact_match"])
    assert loss_order != em_order  # the tasks were built for this; otherwise nothing is tested
    assert _leaderboard(by_loss) == loss_order
    assert _leaderboard(by_em) == em_order
    for run, order, objective in ((by_loss, loss_order, "eval_loss"),
                                  (by_em, em_order, "eval_exact_match")):
        assert run.parent.data.params["sweep_objective"] == objective
        assert run.parent.data.params["sweep_mode"] == ("min" if objective == "eval_loss" else "max")
        champion = run.client.get_model_version_by_alias("judged", CHAMPION_ALIAS)
        assert champion.run_id == rows_of(run)[order[0]]["run_id"]
        assert run.summary["search"]["best_trial"] == order[0]
    assert by_em.summary["search"]["best_eval_exact_match"] == \
        rows[em_order[0]]["eval_metrics"]["eval_exact_match"]


def rows_of(run) -> dict:
    return {r["name"]: r for r in run.summary["trials"]}


@pytest.mark.slow
def test_each_evaluation_logs_scores_and_a_samples_table(runs):
    _, run = runs
    assert tiny_sweeps.assert_params_are_what_ran(run) == 2  # eval.* included
    for row in run.summary["trials"]:
        run_id = row["run_id"]
        for key in ("eval_loss", "eval_exact_match", "eval_token_f1", "eval_shared_chars"):
            assert [m.step for m in run.client.get_metric_history(run_id, key)] == [15, 30], key
        files = sorted(f.path for f in run.client.list_artifacts(run_id, "samples"))
        assert files == [samples_file(15), samples_file(30)]
        local = run.client.download_artifacts(run_id, samples_file(30), str(run.root))
        table = json.loads(open(local).read())
        assert table["columns"] == ["prompt", "reference", "prediction", "exact_match",
                                    "token_f1", "shared_chars"]
        assert len(table["data"]) == 16
        final = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
        # summary.json holds the final samples (MLflow's table rounds a float to 10 decimal
        # places: 0.01639344262295082 is stored as 0.0163934426)
        assert [{k: pytest.approx(v, rel=1e-9, abs=1e-10) if isinstance(v, float) else v
                 for k, v in s.items()} for s in row["samples"]] == final
        em = sum(s["exact_match"] for s in final) / len(final)
        assert run.client.get_metric_history(run_id, "eval_exact_match")[-1].value == \
            pytest.approx(em)
    side = run.root / "outputs" / "judge" / "latest" / "samples_side_by_side.md"
    text = side.read_text()
    assert all(f"**{name}**" in text for name in rows_of(run))
    assert "Say yes." in text or "Pick a letter." in text


def test_asha_keeps_the_trials_best_by_the_objective():
    from orchestrator.search.asha import Asha
    from orchestrator.search.coordinator import SearchCoordinator
    from orchestrator.search.objective import Objective

    objective = Objective("eval_exact_match", "max")
    coordinator = SearchCoordinator(Asha([0.5], eta=2, num_trials=4, objective=objective),
                                    objective)
    coordinator.add_trials([(t, 10) for t in "abcd"])
    # Low loss but few exact answers loses to high loss and many, in this mode.
    assert not coordinator.report("a", 5, {"eval_loss": 3.0, "eval_exact_match": 0.9})
    assert not coordinator.report("b", 5, {"eval_loss": 2.5, "eval_exact_match": 0.7})
    assert coordinator.report("c", 5, {"eval_loss": 0.5, "eval_exact_match": 0.1})
    stop = coordinator.stops()["c"]
    assert stop.reason.startswith("asha: eval_exact_match 0.1000 at rung 1")
    by_loss = SearchCoordinator(Asha([0.5], eta=2, num_trials=4), Objective())
    by_loss.add_trials([(t, 10) for t in "abcd"])
    for t, loss in (("a", 3.0), ("b", 2.5)):
        assert not by_loss.report(t, 5, {"eval_loss": loss, "eval_exact_match": 0.9})
    assert not by_loss.report("c", 5, {"eval_loss": 0.5, "eval_exact_match": 0.1})


@pytest.mark.parametrize("mode, direction", [("min", "MINIMIZE"), ("max", "MAXIMIZE")])
def test_optuna_study_direction_follows_the_mode(mode, direction):
    from orchestrator.config.validate import validate
    from orchestrator.search.optuna_rounds import OptunaSearch

    cfg = validate({"sweep": {"strategy": "optuna", "num_trials": 2, "objective": "eval_token_f1",
                              "mode": mode, "params": {"lora.r": [4, 8]}}})
    assert OptunaSearch(cfg).study.direction.name == direction
