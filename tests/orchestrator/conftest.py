"""Fixtures shared by the orchestrator's tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; `run_sweep` reuses it and leaves it running."""
    import ray

    if not ray.is_initialized():
        # address="local": a new Ray of our own, even if another one runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def optuna_run(ray_session, tmp_path_factory):
    """A tiny Optuna sweep (2 rounds of 2) with the best adapter registered as `best`: read by
    test_optuna, test_registry and test_report (one run for the three)."""
    from support import tiny_sweeps

    root = tmp_path_factory.mktemp("optuna")
    return tiny_sweeps.run(root, tiny_sweeps.config(root, tiny_sweeps.optuna_sweep(),
                                                    register_as=tiny_sweeps.REGISTERED))
