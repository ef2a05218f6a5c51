"""A pack: trials trained together on one worker over one shared base, and what it costs there.

The planner (`orchestrator.planner`) cuts packs; the dispatcher hands them to workers, which check
the estimate against a GPU's free memory before loading anything (`PackWorker.run_pack`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from qlora.config import BaseSpec

#: The share of a budget kept free for what the estimate leaves out (allocator slack, fragmentation).
MARGIN = 0.15


@dataclass
class Pack:
    """Trials trained together on one worker over one shared base."""

    pack_id: str
    base: BaseSpec
    trials: list  # orchestrator.search.trials.Trial: each has .trial_id, .spec and .base


def estimate_bytes(base: BaseSpec, specs: list, device_type: str, rows: dict | None = None) -> int:
    """`qlora.estimate_memory`'s total for these trial specs as one pack (shapes read once);
    `rows` ({DataSpec: RowTokens}, `DataShare.rows`) gives their data's longest rows."""
    from qlora import estimate_memory

    return estimate_memory(base, specs, _shapes(base), device_type=device_type, rows=rows).total


@functools.lru_cache(maxsize=8)
def _shapes(base: BaseSpec) -> dict:
    from qlora.base import resolve_source
    from qlora.memory import model_shapes

    return model_shapes(resolve_source(base), base.trust_remote_code)
