"""One planned trial, the record that travels from the planner to the trial and its row.

The planner builds a `PlannedTrial` (`orchestrator.planner`), the driver writes it to
`runs/<sweep>/plan/<trial_id>.json` with pydantic's JSON, the trial reads it back as the same
typed object (its `config` a validated `TrialConfig`, its `shape` a `TrialShape`), and its
trials-table row is built from it by `results.planned_columns`. No plain dict in between: a
field renamed here is renamed everywhere, and a plan file that does not fit is a clear error.

Light on purpose (pydantic and the configs, no planner, torch or Ray): every trial actor
imports it before its first trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from moe_core.files import write_text
from moe_core.trial import TrialConfig
from orchestrator.shapes import ONE_NODE, TrialShape


class PlannedTrial(BaseModel):
    """A fully resolved trial and what the plan knows of it before it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trial_id: str  # hash of the resolved config (seed included): stable across re-plans
    config_id: str  # hash of the resolved config without the seed: one design point
    sweep: str
    method: str  # the sweep's: grid, random or bayes
    scale: str  # the scale's name, or "custom"
    seed: int
    params: dict[str, Any]  # the swept keys and their resolved values (variant labels for variants)
    derived: dict[str, Any]  # the MoE the study knobs resolved to
    config: TrialConfig
    active_params: int  # without routers (equal within a scale)
    total_params: int
    router_params: int  # active router parameters (once per MoE layer)
    flops_per_token: int  # training FLOPs per token without routers (equal within a scale)
    router_flops_per_token: int
    train_tokens: int
    train_flops: float  # flops_per_token * train_tokens
    est_hours: float  # planned wall time on its shape (start-up and data-parallel efficiency included)
    hardware: str
    sharding: str  # `none` (DDP or one worker) or `fsdp`, as written into train.sharding
    shape: TrialShape  # its workers, GPUs and placement (orchestrator.shapes)
    memory: dict[str, Any] | None = None  # moe_core.memory estimate per GPU (None on CPUs)

    @property
    def memory_per_gpu(self) -> int | None:
        return self.memory["total"] if self.memory else None

    @property
    def devices(self) -> float:
        """GPUs it holds (CPU cores on a CPU sweep)."""
        return self.shape.gpus if self.shape.gpus_per_worker else self.shape.workers * self.shape.cpus_per_worker

    @property
    def device_hours(self) -> float:
        return self.est_hours * self.devices

    def to_dict(self, with_config: bool = True) -> dict[str, Any]:
        """The plan table's view (`moe-sweep plan --json`): the shape's fields inline."""
        out = self.model_dump(mode="json", exclude={"config", "shape"})
        out.update(self.shape.to_dict())
        if with_config:
            out["config"] = self.config.to_dict()
        return out

    def write(self, path: Path) -> None:
        write_text(path, self.model_dump_json())

    @classmethod
    def read(cls, path: Path) -> PlannedTrial:
        """A plan file, also one written before the plan was typed (the shape's fields inline,
        as `to_dict` shows them): `repair` reads the plans of trials finished long ago."""
        text = Path(path).read_text()
        data = json.loads(text)
        if isinstance(data, dict) and "shape" not in data and "workers" in data:
            return cls.model_validate(_untyped(data))
        return cls.model_validate_json(text)


def _untyped(data: dict[str, Any]) -> dict[str, Any]:
    """An untyped plan file's fields as `PlannedTrial`'s (it kept no `workers_per_node`: a
    one-node trial's workers all fit one node, a wider one's fill each of its nodes)."""
    shape_keys = ("workers", "gpus", "gpus_per_worker", "cpus_per_worker", "nodes", "placement")
    out = {k: v for k, v in data.items() if k not in shape_keys}
    workers = int(data["workers"])
    per_node = workers if data.get("placement") == ONE_NODE else workers // max(1, int(data.get("nodes") or 1))
    out["shape"] = TrialShape(workers, float(data["gpus_per_worker"]), float(data["cpus_per_worker"]), max(1, per_node))
    out.setdefault("method", "grid")
    return out
