"""A simulated trial (`moe-sweep run ... --simulate SCALE`): the real orchestrator, no training.

The trial holds the resources of its planned shape (the placement group Tune reserved for it,
as for a real trial) for its planned wall time x SCALE, in one light process whatever its worker
count: the other ranks' bundles stay reserved, but no worker processes start. Its timeline follows
the plan: the start-up term first (paid again on every retry), then the steps, an evaluation
reported to Tune every `eval_every` steps and a checkpoint every `checkpoint_every` (and at the
end) in the trial folder, so a retry or a resumed run continues from the last one. A wider
trial whose placement group lost a node fails as its worker group would, and Tune retries it
elsewhere, from that checkpoint. Its row says `simulated`; analysis keeps such
rows apart from trained ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_core.files import write_json, write_text

if TYPE_CHECKING:
    from orchestrator.planned import PlannedTrial

# Longest single sleep: how often a wide trial checks that its placement group still stands.
POLL_SECONDS = 2.0
# Fewest real seconds between two reports of one trial. SCALE compresses a day into seconds but
# not Tune's driver, which handles each report (a 2-core driver, a few hundred a minute over the
# whole queue); evaluations due in between are folded into the next report (`evals` counts them
# all).
MIN_REPORT_SECONDS = 5.0


class LostWorkers(RuntimeError):
    """A simulated worker group's placement group lost a node (as Ray Train's workers would)."""


def _latest(folder: Path) -> tuple[int, Path | None]:
    pointer = folder / "latest"
    if not pointer.exists():
        return 0, None
    path = folder / pointer.read_text().strip()
    return (json.loads(path.read_text())["step"], path) if path.exists() else (0, None)


def _checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step{step:08d}.json"
    write_json(path, {"step": step, "simulated": True})
    write_text(folder / "latest", path.name)
    for old in folder.glob("step*.json"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


class _Group:
    """The placement group Tune reserved for a wide simulated trial (its workers' bundles)."""

    def __init__(self) -> None:
        from ray.util.placement_group import get_current_placement_group

        self.pg = get_current_placement_group()

    def check(self) -> None:
        from ray.util.placement_group import placement_group_table

        if self.pg is None:
            return
        state = placement_group_table(self.pg).get("state")
        if state != "CREATED":
            raise LostWorkers(f"placement group {self.pg.id.hex()} is {state}: a node of the worker group was lost")


def simulate_trial(planned: PlannedTrial, out: Path, scale: float) -> dict[str, Any]:
    from ray import tune

    from orchestrator.hardware import HARDWARE

    train = planned.config.train
    total_steps = int(planned.train_tokens // train.batch_tokens)
    eval_every = int(train.eval_every or total_steps) or total_steps
    ckpt_every = int(train.checkpoint_every or 0)
    startup = HARDWARE[planned.hardware].startup.seconds(planned.shape.workers) / 3600
    step_seconds = max(0.0, planned.est_hours - startup) * 3600 * scale / max(1, total_steps)
    folder = out / "checkpoints"
    start = time.time()
    step, _ = _latest(folder)
    group = _Group() if planned.shape.workers > 1 else None
    _hold(startup * 3600 * scale, group)
    evals = step // eval_every
    last_report = time.time()
    while step < total_steps:
        nxt = min(total_steps, (step // eval_every + 1) * eval_every)
        if ckpt_every:
            nxt = min(nxt, (step // ckpt_every + 1) * ckpt_every)
        _hold((nxt - step) * step_seconds, group)
        step = nxt
        is_eval = step % eval_every == 0 or step == total_steps
        if step == total_steps or (ckpt_every and step % ckpt_every == 0):
            _checkpoint(folder, step)  # before the report, as the trainer does: Tune never sees past it
        evals += is_eval
        if not is_eval or (step < total_steps and time.time() - last_report < MIN_REPORT_SECONDS):
            continue
        last_report = time.time()
        tune.report({"moe_trial_id": planned.trial_id, "moe_sweep": planned.sweep, "evals": evals, "step": step,
                     "tokens": step * train.batch_tokens, "simulated": 1})
    return {"status": "completed", "steps": total_steps, "tokens": total_steps * train.batch_tokens,
            "wall_seconds": time.time() - start, "val_loss": None, "val_loss_by_set": {}}


def _hold(seconds: float, group: _Group | None) -> None:
    end = time.time() + seconds
    while True:
        left = end - time.time()
        if group is not None:
            group.check()
        if left <= 0:
            return
        time.sleep(min(left, POLL_SECONDS))
