"""Checkpoints: a trial resumed from its checkpoint reproduces the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from support.engine import DATA, by_id, curve, make_base, max_rel

from qlora import TrialSpec, train_pack
from qlora import checkpoint as ckpt


class Killed(Exception):
    """Stands in for a process killed mid-trial."""


def _pair(steps: int = 12) -> list[TrialSpec]:
    return [TrialSpec(trial_id=f"c{k}", seed=50 + k, r=r, alpha=2.0 * r, learning_rate=lr,
                      optimizer=opt, grad_accum_steps=acc, max_steps=steps, micro_batch_size=2,
                      dropout=0.1, eval_every=4, warmup_steps=2, data=DATA)
            for k, (r, lr, opt, acc) in enumerate([(4, 2e-3, "adamw", 1),
                                                   (8, 1e-3, "paged_adamw_8bit", 2)])]


@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_resume_reproduces_uninterrupted_run(data, tmp_path, gc):
    base = make_base(gc)
    trials = _pair()
    reference = by_id(train_pack(base, trials, datasets=data))

    def die_at_step_7(trial_id, step, metrics):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_pack(base, trials, datasets=data, on_metrics=die_at_step_7,
                   checkpoint_dir=tmp_path, checkpoint_every=5)
    assert (tmp_path / "c0" / "latest").read_text() == "step-000005"

    resumed_steps = []
    resumed = by_id(train_pack(base, trials, datasets=data, checkpoint_dir=tmp_path,
                                checkpoint_every=5,
                                on_metrics=lambda t, s, m: resumed_steps.append((t, s)) and None))
    # c0 continues after its step-5 checkpoint; c1 (accumulating 2 micro-steps per step) was at
    # step 3 when the run died, had no checkpoint yet, and starts over.
    assert min(s for t, s in resumed_steps if t == "c0") == 6
    assert min(s for t, s in resumed_steps if t == "c1") == 1
    for trial in trials:
        assert resumed[trial.trial_id].status == "finished"
        assert max_rel(curve(resumed[trial.trial_id]), curve(reference[trial.trial_id])) <= 1e-4


def test_finished_trial_is_not_trained_again(data, tmp_path):
    base = make_base(gc=False)
    trial = _pair(steps=4)[0]
    first = train_pack(base, [trial], datasets=data, checkpoint_dir=tmp_path)[0]
    calls = []
    again = train_pack(base, [trial], datasets=data, checkpoint_dir=tmp_path,
                       on_metrics=lambda *a: calls.append(a))[0]
    assert calls == []
    assert again.status == "finished" and again.eval_loss == first.eval_loss
    assert again.train_losses == first.train_losses and again.adapter is not None


@pytest.mark.parametrize("stage", ["rename", "replace"], ids=["before-rename", "before-pointer"])
def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch, stage):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    ckpt.save(tmp_path, "t", {"w": torch.ones(3)}, optimizer, {"step": 2})

    def kill(*args, **kwargs):
        raise Killed

    # Killed just before the step folder is renamed into place, or before `latest` moves to it.
    monkeypatch.setattr(ckpt.os, stage, kill)
    with pytest.raises(Killed):
        ckpt.save(tmp_path, "t", {"w": torch.full((3,), 2.0)}, optimizer, {"step": 4})
    monkeypatch.undo()
    folder = tmp_path / "t"
    dead = list(folder.glob(".step-000004-*")) if stage == "rename" else [folder / "step-000004"]
    assert dead and all((d / "adapter.safetensors").exists() for d in dead)  # what the kill left
    adapter, _, state = ckpt.load(tmp_path, "t")
    assert state["step"] == 2 and torch.equal(adapter["w"], torch.ones(3))
    ckpt.save(tmp_path, "t", {"w": torch.full((3,), 3.0)}, optimizer, {"step": 4})  # goes on
    adapter, _, state = ckpt.load(tmp_path, "t")
    assert state["step"] == 4 and torch.equal(adapter["w"], torch.full((3,), 3.0))
    # The half-written folder of the killed write is gone once a later write succeeds.
    assert not list(folder.glob(".step-*"))


def test_a_corrupt_latest_falls_back_to_the_checkpoint_before_it(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    for step in (2, 4):
        ckpt.save(tmp_path, "t", {"w": torch.full((3,), float(step))}, optimizer, {"step": step})
    newest = tmp_path / "t" / "step-000004" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])  # truncated: a disk that filled up, say
    adapter, _, state = ckpt.load(tmp_path, "t")
    assert state["step"] == 2 and torch.equal(adapter["w"], torch.full((3,), 2.0))
    (tmp_path / "t" / "step-000002" / "state.json").write_text("{")  # and that one too
    assert ckpt.load(tmp_path, "t") is None  # nothing readable: the trial starts afresh


def test_an_attempt_that_lost_its_claim_writes_no_checkpoint(data, tmp_path):
    """A worker taken for lost (partitioned, hung) may come back and go on training while its
    trial runs again elsewhere: once the later attempt claims the trial, the earlier one writes
    nothing more, so the finished checkpoint stays the later attempt's."""
    trial = _pair()[0]
    reference = train_pack(make_base(False), [trial], datasets=data)[0]
    later = []

    def sent_again_at_step_3(trial_id, step, metrics):
        if step == 3 and not later:  # the driver gave up on this worker: another one resumes it
            later.extend(train_pack(make_base(False), [trial], datasets=data,
                                    checkpoint_dir=tmp_path, checkpoint_every=2, owner="B"))

    [stale] = train_pack(make_base(False), [trial], datasets=data, on_metrics=sent_again_at_step_3,
                         checkpoint_dir=tmp_path, checkpoint_every=2, owner="A")
    [again] = later
    assert again.status == "finished" and again.eval_loss == pytest.approx(reference.eval_loss)
    assert stale.status == "failed" and stale.reason.startswith("fenced: ") and stale.steps == 4
    folder = tmp_path / trial.trial_id
    assert (folder / "latest").read_text() == "step-000012"  # not the stale attempt's step 4
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000010", "step-000012"]
    assert ckpt.load(tmp_path, trial.trial_id)[2]["status"] == "finished"


def test_storage_calls_are_tried_again_while_they_may_pass_then_give_up(caplog):
    """A full disk or a storage that does not answer is tried again with backoff; past the
    patience, `StorageUnavailable`. A missing file is an answer and a bug is a bug: at once."""
    import errno

    tries = []

    def full_twice():
        tries.append(1)
        if len(tries) < 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return "written"

    assert ckpt.patiently("a write", full_twice) == "written" and len(tries) == 3
    assert "a write failed (OSError: [Errno 28] No space left on device)" in caplog.text
    for error in (FileNotFoundError("latest"), TypeError("a bug")):
        def fails(error=error):
            tries.append(1)
            raise error

        tries.clear()
        with pytest.raises(type(error)):
            ckpt.patiently("a read", fails)
        assert len(tries) == 1

    def always_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    with ckpt.patience(1.0), pytest.raises(ckpt.StorageUnavailable,
                                           match=r"a write: failed for 1 s \(the disk is full\)"):
        ckpt.patiently("a write", always_full)
