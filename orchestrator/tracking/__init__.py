"""MLflow: the key names, the tracker (the sweep's only writer), the model registry.

Nothing is imported here, so that `orchestrator.config` answers a bad config in about a second.
"""
