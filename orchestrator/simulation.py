"""A simulated trial (`moe-sweep run ... --simulate SCALE`): the real orchestrator, no training.

The trial holds the resources of its planned shape for its planned wall time x SCALE, in one
light process whatever its worker count: a one-worker trial holds the bundle Tune placed it in;
a wider one reserves its workers' placement group itself, as Ray Train does for a real one (same
bundles, same strategy), and holds it without starting worker processes. Its timeline follows
the plan: the start-up term first (paid again on every retry), then the steps, an evaluation
reported to Tune every `eval_every` steps and a checkpoint every `checkpoint_every` (and at the
end), kept by Tune and in the trial folder, so a retry or a resumed run continues from the last
one. A wider trial whose placement group lost a node fails as its Ray Train workers would, and
Tune retries it from its checkpoint elsewhere. Its row says `simulated`; analysis keeps such
rows apart from trained ones.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_core.files import write_json

# Longest single sleep: how often a wide trial checks that its placement group still stands.
POLL_SECONDS = 1.0


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
    tmp = folder / "latest.tmp"
    tmp.write_text(path.name)
    tmp.replace(folder / "latest")  # the pointer moves atomically
    for old in folder.glob("step*.json"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


class _Group:
    """The placement group a wide simulated trial reserves for its workers, as Ray Train's
    worker group does for a real one (Ray removes it with the trial's process if that dies)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        import ray
        from ray.util.placement_group import placement_group

        gpus, cpus = meta["gpus_per_worker"], meta["cpus_per_worker"]
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * meta["workers"], strategy=meta["placement"])
        ray.get(self.pg.ready())  # waits, as Ray Train's workers would, until the gang is placed

    def check(self) -> None:
        from ray.util.placement_group import placement_group_table

        state = placement_group_table(self.pg).get("state")
        if state != "CREATED":
            raise LostWorkers(f"placement group {self.pg.id.hex()} is {state}: a node of the worker group was lost")

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.pg)


def simulate_trial(meta: dict[str, Any], out: Path, scale: float) -> dict[str, Any]:
    from ray import tune

    from orchestrator.hardware import HARDWARE

    config = meta["config"]
    train = config["train"]
    total_steps = int(meta["train_tokens"] // train["batch_tokens"])
    eval_every = int(train.get("eval_every") or total_steps) or total_steps
    ckpt_every = int(train.get("checkpoint_every") or 0)
    startup = HARDWARE[meta["hardware"]].startup.seconds(meta["workers"]) / 3600
    step_seconds = max(0.0, meta["est_hours"] - startup) * 3600 * scale / max(1, total_steps)
    folder = out / "checkpoints"
    start = time.time()
    step, _ = _latest(folder)
    group = _Group(meta) if meta["workers"] > 1 else None
    try:
        _hold(startup * 3600 * scale, group)
        evals = step // eval_every
        while step < total_steps:
            nxt = min(total_steps, (step // eval_every + 1) * eval_every)
            if ckpt_every:
                nxt = min(nxt, (step // ckpt_every + 1) * ckpt_every)
            _hold((nxt - step) * step_seconds, group)
            step = nxt
            is_eval = step % eval_every == 0 or step == total_steps
            is_ckpt = step == total_steps or (ckpt_every and step % ckpt_every == 0)
            if not (is_eval or is_ckpt):
                continue
            evals += is_eval
            metrics = {"moe_trial_id": meta["trial_id"], "moe_sweep": meta["sweep"], "evals": evals, "step": step,
                       "tokens": step * train["batch_tokens"], "simulated": 1}
            if is_ckpt:
                path = _checkpoint(folder, step)
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / path.name).write_text(path.read_text())
                    (Path(tmp) / "latest").write_text(path.name)
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(metrics)
    finally:
        if group is not None:
            group.release()
    return {"status": "completed", "steps": total_steps, "tokens": total_steps * train["batch_tokens"],
            "wall_seconds": time.time() - start, "val_loss": {}, "val_loss_macro": None}


def _hold(seconds: float, group: _Group | None) -> None:
    end = time.time() + seconds
    while True:
        left = end - time.time()
        if group is not None:
            group.check()
        if left <= 0:
            return
        time.sleep(min(left, POLL_SECONDS))
