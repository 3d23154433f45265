"""A sweep's parameters as a Ray Tune search space, and the persisted Optuna searcher.

Sampling is Optuna's (through Tune's `OptunaSearch`); FLOP matching stays in the planner: each
sampled point is resolved by the trial itself (`trial_fn.run_trial`), and a point that cannot be
matched exactly ends without a result, which Optuna records as pruned (infeasible).
"""

from __future__ import annotations

from typing import Any

from orchestrator.results import SweepPaths
from orchestrator.sweep_spec import ParameterSpec, SweepSpec


def tune_domain(p: ParameterSpec) -> Any:
    from ray import tune

    if not p.is_range:
        return tune.choice(p.choices)
    lo, hi = float(p.min), float(p.max)
    return {
        "uniform": lambda: tune.uniform(lo, hi),
        "log_uniform": lambda: tune.loguniform(lo, hi),
        "int": lambda: tune.randint(int(lo), int(hi) + 1),  # randint's upper bound is exclusive
        "int_log_uniform": lambda: tune.lograndint(int(lo), int(hi) + 1),
    }[p.distribution]()


def search_space(spec: SweepSpec) -> dict[str, Any]:
    return {name: tune_domain(p) for name, p in spec.parameters.items()}


def _sampler(spec: SweepSpec) -> Any:
    import optuna

    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=spec.search_seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.search_seed)
    return optuna.samplers.TPESampler(seed=spec.search_seed)


def optuna_searcher(spec: SweepSpec, paths: SweepPaths) -> tuple[Any, int]:
    """The OptunaSearch for `spec`, its study stored in `runs/<sweep>/optuna.db` so a resumed
    sweep keeps its history, and how many points are left to sample. Points a killed driver
    left running are failed in the study and enqueued again, so they resume from their
    checkpoints instead of being lost."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{paths.optuna}")
    metrics = spec.metrics
    study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                directions=[m.goal for m in metrics], sampler=_sampler(spec))
    done, again = 0, []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif t.state == TrialState.RUNNING:  # WAITING (enqueued, never asked) ones are asked in turn
            again.append(dict(t.params))
            study.tell(t.number, state=TrialState.FAIL)
    multi = len(metrics) > 1
    searcher = OptunaSearch(
        metric=[m.name for m in metrics] if multi else metrics[0].name,
        mode=[m.mode for m in metrics] if multi else metrics[0].mode,
        sampler=_sampler(spec), study_name=spec.name, storage=storage,
        points_to_evaluate=again or None,
    )
    return searcher, max(0, (spec.trials or 0) - done)
