"""orchestrator: a sweep of LoRA trials, from Hydra config to packed Ray workers to MLflow runs.

    python -m orchestrator sweep=rank_grid            # conf/ + sweeps/ -> trials -> packs -> runs

    from orchestrator.validate import validate        # composed config -> typed schema.Config
    from orchestrator.search import expand            # Config -> [Trial] (grid or random)
    from orchestrator.sweep import run_sweep          # Config -> exit status (0 ok, 1 a trial failed)

Nothing is imported here: `python -m orchestrator` must answer a bad config in a second or two,
without loading Ray, MLflow or torch.
"""
