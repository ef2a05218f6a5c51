"""orchestrator: a sweep of LoRA trials, from Hydra config to packed Ray workers to MLflow runs.

    python -m orchestrator sweep=rank_grid            # conf/ + sweeps/ -> trials -> packs -> runs
    python -m orchestrator sweep=asha tracking.register_as=best   # successive halving, best registered
    python -m orchestrator sweep=optuna               # TPE proposals from the results so far
    python -m orchestrator.load models:/best@champion --prompt TEXT   # the best adapter, generating
    python -m orchestrator.report --sweep asha        # a past sweep's plots, rebuilt from MLflow

    from orchestrator.config.validate import validate        # composed config -> typed schema.Config
    from orchestrator.search.expand import expand     # Config -> [Trial] (grid, random, optuna's 1st)
    from orchestrator.sweep import run_sweep          # Config -> exit status (0 ok, 1 a trial failed)
    from orchestrator.load import load_adapter        # models:/NAME@champion -> PeftModel on its base

Nothing is imported here: `python -m orchestrator` must answer a bad config in a second or two,
without loading Ray, MLflow or torch.
"""
