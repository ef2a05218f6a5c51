"""The fault tests' reference: their CLI sweep run once without faults (test_faults, test_cluster)."""

from __future__ import annotations

import pytest
from support.fault_sweeps import OVERRIDES, Ledger, ledger_of


@pytest.fixture(scope="session")
def reference(ray_session, tmp_path_factory) -> Ledger:
    """The CLI's sweep run once without faults, here on the session's Ray."""
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate
    from orchestrator.sweep import run_sweep

    root = tmp_path_factory.mktemp("reference")
    config = validate(compose([*OVERRIDES, f"tracking.uri=sqlite:///{root}/mlflow.db",
                               f"tracking.artifact_location={root}/mlartifacts",
                               f"output_dir={root}/outputs", "pack.max_adapters=2",
                               "cluster.num_workers=2"]))
    assert run_sweep(config) == 0
    ledger = ledger_of(config.tracking.uri)
    assert len(ledger.runs) == 4
    return ledger
