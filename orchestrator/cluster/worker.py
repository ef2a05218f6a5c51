"""`PackWorker`: the Ray actor that trains packs one after another on one device.

A worker keeps its loaded base between packs (reloading only for a different `BaseSpec`), streams
metrics and trial ends through an `_Emitter`, and turns what the engine raised into a
`PackOutcome`: out of device memory marks it `oom` with the trials that had not ended
`interrupted` (the driver splits the pack, `orchestrator.cluster.faults`); any other exception
fails the trials that had not ended (a bug or a bad input would fail the same way again).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import ray
from ray.util.queue import Queue

from orchestrator.cluster.events import (
    MetricsEvent,
    PackOutcome,
    PackStarted,
    Placement,
    TrialEnded,
    failed_result,
    first_line,
)
from qlora.config import BaseSpec, TrialSpec

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5  # how often a worker sends its buffered events to the driver


# -- the worker ---------------------------------------------------------------------------------

class _Emitter:
    """Buffers events and ships them to the driver's queue from a background thread."""

    def __init__(self, queue: Queue, interval: float = FLUSH_INTERVAL_S):
        self._queue = queue
        self._interval = interval
        self._buffer: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="metrics-emitter", daemon=True)
        self._thread.start()

    def emit(self, event) -> None:
        with self._lock:
            self._buffer.append(event)

    def close(self) -> None:
        """Stop the thread and send what is left, so it reaches the queue before the outcome."""
        self._stop.set()
        self._thread.join()
        self._flush()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            items, self._buffer = self._buffer, []
        if not items:
            return
        try:
            self._queue.put_nowait_batch(items)
        except Exception as e:  # live progress is best effort; the outcome still carries results
            if not self._warned:
                log.warning("dropping streamed metrics: %s", first_line(e))
                self._warned = True


@ray.remote
class PackWorker:
    """Trains packs one after another on one device, keeping the loaded base between them."""

    def __init__(self, index: int, queue: Queue):
        # Cheap on purpose: the driver counts a worker as placed once `placement` answers, which
        # waits for this; the engine's imports follow in `warm`.
        self._index = index
        self._queue = queue
        self._base = None
        self._loads = 0  # bases loaded so far (backfill and reuse keep this low)
        self._bits: float | None = None  # storage bits per weight of the loaded base's linears
        self._rss0 = None

    def warm(self) -> None:
        """Import the engine now: Ray builds workers while the driver still plans and records,
        so the first pack does not wait for these imports (the driver calls it after creating)."""
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        import qlora.train  # noqa: F401
        from qlora.memory import rss_bytes

        if self._rss0 is None:
            self._rss0 = rss_bytes()  # the runtime's share, left out of a CPU pack's peak

    def placement(self) -> Placement:
        """Where this worker runs and which devices Ray gave it."""
        return Placement(
            worker=self._index,
            node_id=ray.get_runtime_context().get_node_id(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            gpu_ids=[str(g) for g in ray.get_gpu_ids()],
        )

    def run_pack(self, pack_id: str, base_spec: BaseSpec, specs: list[TrialSpec],
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 hooks=None, data=None, storage_patience_s: float | None = None) -> PackOutcome:
        """Train `specs` together, each from its checkpoint under `checkpoint_dir` if it has one.

        An engine exception fails the trials that had not ended; out of device memory instead
        marks the outcome `oom`, with those trials `interrupted`, for the driver to split.
        With `hooks` (a search's, e.g. `orchestrator.search.coordinator.CoordinatorHooks`), whose
        `for_pack` gives this pack's callbacks, trials may be stopped early and freed slots are
        backfilled with waiting trials; their results are in the outcome too. `data` (a
        `DataShare`) names the driver's tokenized data, opened here instead of tokenized again.
        A checkpoint that cannot be written or read for `storage_patience_s` (cluster.lost_timeout_s)
        ends the pack with `storage_lost`: the driver stops the sweep, resumable.
        """
        import torch

        from orchestrator.cluster.pack import estimate_bytes
        from qlora import train_pack
        from qlora.checkpoint import StorageUnavailable, patience
        from qlora.memory import peak_bytes, reset_peak

        self.warm()  # a no-op after the first time
        placement = self.placement()
        started = time.time()
        cuda = torch.cuda.is_available()
        try:
            estimate = estimate_bytes(base_spec, specs, "cuda" if cuda else "cpu",
                                      data.rows if data is not None else None)
        except Exception:  # a model whose config the estimate cannot read: load it anyway
            estimate = None
        refused = self._refuse(estimate, len(specs)) if cuda and estimate else None
        if refused:  # cut before it runs: the driver splits it as after an out-of-memory
            return PackOutcome(pack_id, [failed_result(s.trial_id, refused) for s in specs],
                               placement, started, time.time(), refused, oom=True,
                               interrupted=[s.trial_id for s in specs], memory_estimate=estimate)
        reset_peak()
        emitter = _Emitter(self._queue)
        emitter.emit(PackStarted(pack_id, placement, started))
        ended: dict[str, object] = {}
        hooks = hooks.for_pack(pack_id, base_spec, specs) if hooks is not None else None
        loads = self._loads

        def on_metrics(trial_id: str, step: int, metrics: dict) -> bool:
            emitter.emit(MetricsEvent(pack_id, trial_id, step, dict(metrics), time.time()))
            return hooks is not None and hooks.on_metrics(trial_id, step, metrics)

        def on_trial_end(result) -> None:
            ended[result.trial_id] = result
            emitter.emit(TrialEnded(pack_id, result.trial_id, result.status, result.steps,
                                    result.eval_loss, result.reason, time.time()))
            if hooks is not None:
                hooks.on_trial_end(result.trial_id)

        error, oom, lost, base = None, False, False, None
        try:
            base = self._base_for(base_spec)
            datasets = data.open() if data is not None else None
            with patience(storage_patience_s):
                train_pack(base, specs, datasets=datasets, on_metrics=on_metrics,
                           on_trial_end=on_trial_end,
                           next_trial=hooks.next_trial if hooks is not None else None,
                           exploit=hooks.exploit if hooks is not None else None,
                           checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                           owner=f"{placement.hostname}:{placement.pid}:{pack_id}:"
                                 f"{uuid.uuid4().hex}")
        except torch.OutOfMemoryError as e:
            # Splitting helps only if the base itself fitted; the frozen base is still sound.
            oom = base is not None
            error = f"{type(e).__name__}: {first_line(e)}"
        except StorageUnavailable as e:  # the base is sound; the sweep stops, resumable
            lost, error = True, f"{type(e).__name__}: {first_line(e)}"
        except Exception as e:
            error = f"{type(e).__name__}: {first_line(e)}"
            self._drop_base()  # its state after a failed step is not worth trusting
        finally:
            emitter.close()
        if oom:
            self._free_memory()  # the failed step's tensors, now that the traceback is gone
        if hooks is not None:
            specs = [*specs, *hooks.backfilled]
        interrupted = [s.trial_id for s in specs if s.trial_id not in ended] if error else []
        results = [ended.get(s.trial_id) or failed_result(s.trial_id, f"pack failed: {error}")
                   for s in specs]
        peak = peak_bytes() - (0 if cuda else self._rss0)
        return PackOutcome(pack_id, results, placement, started, time.time(), error, oom=oom,
                           interrupted=interrupted, base_loads=self._loads - loads,
                           memory_estimate=estimate, memory_peak=peak,
                           bits_per_weight=self._bits if base is not None else None,
                           storage_lost=lost)

    def _refuse(self, estimate: int, n_trials: int) -> str | None:
        """Why a pack of several trials would not fit this GPU's free memory (None: it fits)."""
        import torch

        from orchestrator.cluster.pack import MARGIN

        # Memory this worker holds (a kept base) is free to the pack too.
        available = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
        if n_trials < 2 or estimate * (1 + MARGIN) <= available:
            return None
        return (f"OutOfMemoryError: the pack's estimate {estimate / 2**30:.2f} GiB (+{MARGIN:.0%})"
                f" exceeds the {available / 2**30:.2f} GiB free on this GPU")

    def _base_for(self, spec: BaseSpec):
        # Memory options (gradient checkpointing, offload) are applied at load time, so a base is
        # reused only for an equal spec; the planner keeps such trials in separate packs anyway.
        if self._base is None or self._base.spec != spec:
            from qlora import load_base

            self._drop_base()
            from qlora.memory import measured_bits_per_weight

            self._base = load_base(spec)
            self._loads += 1
            self._bits = measured_bits_per_weight(self._base.model)
        return self._base

    def _drop_base(self) -> None:
        self._base = None
        self._free_memory()

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
