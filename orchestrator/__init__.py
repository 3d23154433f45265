"""orchestrator: plans FLOP-matched trials and drives moe_core on them (Ray Tune, Optuna)."""
