"""Ray: connecting, the pack workers, dispatching packs, and what happens on faults.

Nothing is imported here, so that `orchestrator.config` answers a bad config in about a second.
"""
