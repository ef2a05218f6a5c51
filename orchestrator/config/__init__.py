"""The edge: composition, validation and checks of a sweep's config, before anything starts.

Nothing is imported here, so that `orchestrator.config` answers a bad config in about a second.
"""
