"""Tune's actor reuse, changed in one place (`orchestrator/actor_reuse.py`): a trial whose own
actor already holds resources keeps it instead of taking a cached actor and killing its own."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.actor_reuse import keeps_own_actor, reuse_own_starting_actors


def _controller(own: dict, live: set, resetting: set = frozenset()):
    return SimpleNamespace(_trial_to_actor=own, _resetting_trials=set(resetting),
                           _actor_manager=SimpleNamespace(is_actor_started=lambda a: a in live))


def test_a_trial_keeps_its_own_actor_only_while_that_actor_holds_resources():
    c = _controller({"starting": "a1", "waiting": "a2"}, live={"a1"})
    assert keeps_own_actor(c, "starting")  # its process is up or coming up: killing it wastes it
    assert not keeps_own_actor(c, "waiting")  # still waiting for resources: the cached actor is free
    assert not keeps_own_actor(c, "new")  # no actor of its own yet
    assert not keeps_own_actor(_controller({"t": "a"}, live={"a"}, resetting={"t"}), "t")  # already taking one
    assert not keeps_own_actor(SimpleNamespace(), "t")  # another Tune's internals: its own rules


def test_the_patch_goes_in_once_and_asks_tune_only_when_the_trial_has_no_starting_actor(monkeypatch):
    from ray.tune.execution.tune_controller import TuneController

    calls = []
    monkeypatch.setattr(TuneController, "_maybe_reuse_cached_actor", lambda self, trial: calls.append(trial) or True)
    assert reuse_own_starting_actors() and reuse_own_starting_actors()  # twice: wrapped once
    patched = TuneController._maybe_reuse_cached_actor
    c = _controller({"starting": "a1", "waiting": "a2"}, live={"a1"})
    assert patched(c, "starting") is False and calls == []
    assert patched(c, "waiting") is True and calls == ["waiting"]
