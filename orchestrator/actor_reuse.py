"""One change to Ray Tune's actor reuse: a trial whose own new actor already has its resources is
left to it, instead of taking a cached actor and killing its own.

With `reuse_actors`, Tune asks for a new actor (a placement group, then a process) for every
trial it stages, and when a finished trial's actor is cached it hands it to the first staged
trial, removing that trial's own actor (ray-project/ray#36020: the own actor is "not needed
anymore"). That is free while the own actor still waits for resources, but the first staged
trial is the oldest, whose placement group Ray granted first: its actor is usually a process
already starting. Killing it frees its resources, the next staged trial's actor starts on them,
the next cached actor kills that one too, and so on: measured on the simulated study
(`bench/cluster_schedule.py`), a phase of short trials started 3-6 processes for each one it
needed, the machine busy starting and killing them (394 processes where 107 would do).

`reuse_own_starting_actors` makes Tune skip such a trial when it looks for one to take a cached
actor: the cached actor goes to a staged trial still waiting for resources (whose request is then
withdrawn), and the starting actor runs its own trial. Nothing else changes; where Tune's
internals are not the ones this was written against (Ray 2.60), it changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED = "_moe_sweep_keeps_starting_actors"


def keeps_own_actor(controller: Any, trial: Any) -> bool:
    """Whether `trial` should keep its own actor rather than take a cached one: it has one, it is
    not already being reset onto a cached actor, and its actor holds resources (started or
    starting)."""
    try:
        own = controller._trial_to_actor.get(trial)
        return (own is not None and trial not in controller._resetting_trials
                and controller._actor_manager.is_actor_started(own))
    except AttributeError:  # another Tune: its own rules
        return False


def reuse_own_starting_actors() -> bool:
    """Patch `TuneController._maybe_reuse_cached_actor` once per process; False where Tune's
    internals differ (nothing is changed then)."""
    try:
        from ray.tune.execution.tune_controller import TuneController
    except ImportError:
        return False
    original = getattr(TuneController, "_maybe_reuse_cached_actor", None)
    if original is None:
        logger.debug("Tune has no _maybe_reuse_cached_actor: actor reuse left as it is")
        return False
    if getattr(original, _PATCHED, False):
        return True

    def _maybe_reuse_cached_actor(self, trial):
        if keeps_own_actor(self, trial):
            return False
        return original(self, trial)

    setattr(_maybe_reuse_cached_actor, _PATCHED, True)
    TuneController._maybe_reuse_cached_actor = _maybe_reuse_cached_actor
    return True
