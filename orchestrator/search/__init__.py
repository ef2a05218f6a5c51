"""A sweep's trials and the search over them: ids, grid and random, Optuna, ASHA, the coordinator.

Nothing is imported here, so that `orchestrator.config` answers a bad config in about a second.
"""
