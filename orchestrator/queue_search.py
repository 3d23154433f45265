"""The queue as Tune's search algorithm: planned trials handed to Tune in queue order, as few at
a time as keep a wide trial first in line, as many of one shape as let Tune reuse its actors.

Tune creates a trial (and asks Ray for its placement group) when its search algorithm hands one
out. Two limits pull against each other:

- A wide trial waiting for whole nodes must not see narrow trials far down the queue take the
  GPUs one by one: Ray gives a freed GPU to whichever pending placement group fits. So while the
  trials waiting are of mixed shapes, at most `lookahead` (8) wait at once, as before.
- Tune keeps a finished trial's actor for the next trial only if a trial of the same shape is
  waiting, and no more actors than such trials (`ray.tune.utils.object_cache`); the rest are
  killed, and each new one is a process to start (seconds of CPU importing ray.tune). With 64
  one-GPU trials running and 8 waiting, any burst of more than 8 ends killed actors that the
  next trials then started again: measured on the simulated study, the one-GPU phase ran at a
  fifth to half of the cluster's GPUs, the machine busy starting processes.

So trials of one shape may wait up to as many as the cluster runs at once, while nothing wider
waits: no wide trial is passed, and every finished actor has a trial to take it.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search import Searcher


class QueueGate:
    """Which handed-out trials are still waiting to start, and whether the next may be handed out.
    `width` is what a trial takes of the cluster's `capacity` (GPUs, or CPUs on a CPU cluster)."""

    def __init__(self, width: dict[str, float], capacity: float, lookahead: int) -> None:
        self.width, self.capacity, self.lookahead = width, capacity, lookahead
        self.waiting: dict[str, float] = {}

    def same_shape_limit(self, key: str) -> int:
        """Trials of `key`'s shape that may wait at once: as many as the cluster runs."""
        w = self.width[key]
        return max(self.lookahead, int(self.capacity // w) if w > 0 else self.lookahead)

    @property
    def most_waiting(self) -> int:
        """The most trials that can wait at once (Tune's pending-trial limit)."""
        return max([self.lookahead] + [self.same_shape_limit(k) for k in set(self.width)])

    def admits(self, key: str) -> bool:
        if len(self.waiting) < self.lookahead:
            return True
        w = self.width[key]
        return all(v == w for v in self.waiting.values()) and len(self.waiting) < self.same_shape_limit(key)

    def handed_out(self, key: str) -> None:
        self.waiting[key] = self.width[key]

    def started(self, key: str) -> None:
        self.waiting.pop(key, None)


class QueueSearcher(Searcher):
    """Hands Tune `{"trial": key}` for each key of the queue in order, when the gate admits it."""

    def __init__(self, keys: list[str], gate: QueueGate) -> None:
        super().__init__()
        self.keys, self.gate, self.next = keys, gate, 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next >= len(self.keys):
            return Searcher.FINISHED
        key = self.keys[self.next]
        if not self.gate.admits(key):
            return None  # Tune asks again on its next step
        self.next += 1
        self.gate.handed_out(key)
        return {"trial": key}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the trials tables record outcomes; the queue's order does not depend on them

    def save(self, checkpoint_path: str) -> None:
        pass  # a resumed run plans its queue afresh from the trials tables

    def restore(self, checkpoint_path: str) -> None:
        pass
