"""The FLOP-matched planner: a sweep YAML in, fully resolved trials out, before anything runs.

For each point of the sweep (a grid combination, a random sample, or an Optuna suggestion) the
planner sets the point's dotted keys in `base`, fills the model from its `scale`, derives the MoE
from the study knobs (`orchestrator.study`), validates the whole trial config, and fixes the token
budget so that every trial of a scale spends the same training compute.

Matching convention. Within a scale every trial has the dense baseline's active FFN width
(sum k_i g_i + K_s g_s = 1), hence the same `active_params` and `flops_per_token`. Both exclude
the router (n * d per MoE layer, which grows with the expert count n); the router is reported
apart as `router_params` and `router_flops_per_token`. The counts and the budget rule
(`tokens_per_active_param` x the `train.budget_params` count, in whole optimizer steps) live in
`moe_core.accounting`; the planner reads them from there, as the trainer does, so the two agree
without the plan writing a token count into the trial.

Every user mistake raises `ConfigError` naming the file, the line and the key; combinations
with no exact match are returned as `SkippedTrial`s with the reason.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from moe_core.accounting import count_params
from moe_core.config import ModelConfig
from moe_core.data.config import DataConfig
from moe_core.errors import ConfigError, _model_in
from moe_core.train.config import TrainConfig
from moe_core.trial import TrialConfig
from moe_core.yaml_io import load_yaml_with_lines
from orchestrator.hardware import HARDWARE, Hardware
from orchestrator.planned import PlannedTrial
from orchestrator.scales import SCALES
from orchestrator.shapes import ShapeChoice, choose_shape
from orchestrator.study import Infeasible, StudyConfig, derive_moe
from orchestrator.sweep_spec import SweepSpec

# What `base` (and so a parameter path) may contain; `scale` is a name, the rest are configs.
BASE_SECTIONS: dict[str, type[BaseModel] | None] = {
    "scale": None, "study": StudyConfig, "model": ModelConfig, "train": TrainConfig, "data": DataConfig,
}


@dataclass(frozen=True)
class SkippedTrial:
    sweep: str
    seed: int
    params: dict[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "seed": self.seed, "params": self.params, "reason": self.reason}


@dataclass
class Plan:
    spec: SweepSpec
    path: Path
    trials: list[PlannedTrial] = field(default_factory=list)
    skipped: list[SkippedTrial] = field(default_factory=list)
    estimate: PlannedTrial | None = None  # bayes: a representative point, for cost estimates

    @property
    def planned_trials(self) -> int:
        """Trials this sweep will run: the grid/random list, or a bayes sweep's budget."""
        return len(self.trials) if self.spec.method != "bayes" else (self.spec.trials or 0) * len(self.spec.seed_list)

    @property
    def configurations(self) -> int:
        """Distinct design points (trials that differ only in the seed count once)."""
        if self.spec.method == "bayes":
            return self.spec.trials or 0
        return len({t.config_id for t in self.trials})

    @property
    def train_flops(self) -> float:
        if self.spec.method == "bayes":
            return self.planned_trials * self.estimate.train_flops if self.estimate else float("nan")
        return sum(t.train_flops for t in self.trials)

    @property
    def device_hours(self) -> float:
        """GPU-hours (or CPU-core-hours) over all trials."""
        if self.spec.method == "bayes":
            return self.planned_trials * self.estimate.device_hours if self.estimate else float("nan")
        return sum(t.device_hours for t in self.trials)

    @property
    def hardware(self) -> Hardware:
        return _hardware(self.spec)

    @property
    def largest(self) -> PlannedTrial | None:
        """The trial needing the most memory per GPU (None where memory is not planned)."""
        trials = [t for t in (self.trials or ([self.estimate] if self.estimate else [])) if t.memory]
        return max(trials, key=lambda t: t.memory_per_gpu, default=None)


class SweepFile:
    """A parsed sweep YAML with the line of every key, for error messages."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        data, self.lines = load_yaml_with_lines(self.path)
        try:
            self.spec = SweepSpec.from_dict(data)
        except ConfigError as err:
            raise self.error(self.key_path(err.path), err.detail) from None
        self._check_parameters()

    def key_path(self, dotted: str) -> tuple:
        """The file's key path for a dotted error path, whose keys may themselves contain dots
        (parameter names like `train.lr`): match the longest run of parts at each level."""
        parts, out = _split_error_path(dotted), ()
        while parts:
            for n in range(len(parts), 0, -1):
                key = ".".join(str(p) for p in parts[:n]) if n > 1 else parts[0]
                if out + (key,) in self.lines:
                    out, parts = out + (key,), parts[n:]
                    break
            else:
                return out + tuple(parts)
        return out

    def line(self, key_path: tuple) -> int:
        """The line of the longest prefix of `key_path` found in the file (1 if none)."""
        for n in range(len(key_path), 0, -1):
            if key_path[:n] in self.lines:
                return self.lines[key_path[:n]]
        return 1

    def error(self, key_path: tuple, detail: str) -> ConfigError:
        dotted = ".".join(str(p) for p in key_path)
        return ConfigError(detail, where=f"{self.path}:{self.line(key_path)}", path=dotted)

    def _check_parameters(self) -> None:
        spec = self.spec
        for section in spec.base:
            if section == "seed":
                raise self.error(("base", "seed"), "set seeds with the sweep's top-level `seeds`, not in base")
            if section not in BASE_SECTIONS:
                raise self.error(("base", section), _unknown(section, BASE_SECTIONS))
        for name, param in spec.parameters.items():
            where = ("parameters", name)
            if param.is_range and spec.method == "grid":
                raise self.error(where, f"a range ({param.distribution}) cannot be gridded; give `values`, or use method random or bayes")
            if param.variants is not None:
                for label, keys in param.variants.items():
                    for key in keys:
                        problem = check_path(key)
                        if problem:
                            raise self.error(where + ("variants", label, key), problem)
            else:
                problem = check_path(name)
                if problem:
                    raise self.error(where, problem)
                if name == "scale" and param.values is not None:
                    for value in param.values:
                        if value not in SCALES:
                            raise self.error(where, f"unknown scale '{value}'; known: {', '.join(SCALES)}")
        if "scale" in spec.base and spec.base["scale"] not in SCALES:
            raise self.error(("base", "scale"), f"unknown scale '{spec.base['scale']}'; known: {', '.join(SCALES)}")


def _split_error_path(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in path.split(".")] if path else []


def _suggest(key: str, allowed: Any) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"


def _unknown(key: str, allowed: Any) -> str:
    return f"unknown key; {_suggest(key, allowed)}"


def check_path(dotted: str) -> str | None:
    """Why `dotted` is not a key of the trial description (None if it is)."""
    if dotted == "seed":
        return "seed is swept with the sweep's top-level `seeds`"
    head, *rest = dotted.split(".")
    if head not in BASE_SECTIONS:
        return f"'{head}' is not a section of base; {_suggest(head, BASE_SECTIONS)}"
    model: type[BaseModel] | None = BASE_SECTIONS[head]
    walked = head
    for part in rest:
        if model is None:
            return f"'{walked}' has no sub-keys (cannot set '{dotted}')"
        if part not in model.model_fields:
            return f"'{walked}' has no key '{part}'; {_suggest(part, sorted(model.model_fields))}"
        annotation = model.model_fields[part].annotation
        # Lists of configs (model.moe.experts, study.expert_sets) are set whole, not item by item.
        model = None if _is_sequence(annotation) else _model_in(annotation)
        walked += "." + part
    return None


def _is_sequence(annotation: Any) -> bool:
    """`tuple[X, ...]` or `list[X]`, also inside `| None`."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    return origin in (typing.Union, types.UnionType) and any(_is_sequence(a) for a in typing.get_args(annotation))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = copy.deepcopy(value)


def _get_path(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def trial_id(config: TrialConfig) -> str:
    """Deterministic id of a resolved trial: independent of key order, seed included."""
    return _digest(config.to_dict())


def config_id(config: TrialConfig) -> str:
    """The design point of a trial: its id with the seed left out."""
    return _digest({**config.to_dict(), "seed": None})


def _digest(tree: dict[str, Any]) -> str:
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _hardware(spec: SweepSpec) -> Hardware:
    return HARDWARE[spec.hardware or ("h100" if spec.resources.gpus > 0 else "cpu")]


class Planner:
    """Resolves points of one sweep into trials."""

    def __init__(self, sweep: SweepFile) -> None:
        self.sweep, self.spec = sweep, sweep.spec

    # -- points -----------------------------------------------------------------------------
    def grid_points(self) -> Iterator[dict[str, Any]]:
        names = list(self.spec.parameters)
        for combo in itertools.product(*(self.spec.parameters[n].choices for n in names)):
            yield dict(zip(names, combo))

    def random_points(self) -> Iterator[dict[str, Any]]:
        """Draws from the same Ray Tune domains a Bayesian sweep's search space uses
        (`search_space.tune_domain`), so the two can never mean different distributions."""
        import numpy as np

        from orchestrator.search_space import tune_domain

        rng = np.random.default_rng(self.spec.search_seed)
        domains = {name: tune_domain(p) for name, p in self.spec.parameters.items()}
        for _ in range(self.spec.trials or 0):
            yield {name: _python(d.sample(random_state=rng)) for name, d in domains.items()}

    def central_point(self) -> dict[str, Any]:
        """A representative point (first choice, middle of each range) for cost estimates."""
        out = {}
        for name, p in self.spec.parameters.items():
            if p.is_range:
                mid = math.sqrt(p.min * p.max) if "log" in (p.distribution or "") else (p.min + p.max) / 2
                out[name] = round(mid) if p.distribution in ("int", "int_log_uniform") else mid
            else:
                out[name] = p.choices[0]
        return out

    # -- resolution -------------------------------------------------------------------------
    def assignments(self, point: dict[str, Any]) -> dict[str, Any]:
        """Dotted key -> value for a point (variants expanded to their keys)."""
        out: dict[str, Any] = {}
        for name, value in point.items():
            p = self.spec.parameters[name]
            out.update(p.variants[value] if p.variants is not None else {name: value})
        return out

    def resolve(self, point: dict[str, Any], seed: int) -> PlannedTrial:
        """The trial at `point` with `seed`. Raises `Infeasible` (no exact FLOP match) or
        `ConfigError` (a user mistake, naming file, line and key)."""
        spec = self.spec
        tree = copy.deepcopy(spec.base)
        assigned = self.assignments(point)
        for dotted, value in assigned.items():
            _set_path(tree, dotted, value)
        context = f" (at {_point_text(point)})" if point else ""
        scale = tree.get("scale")
        model = _deep_merge(SCALES[scale].model, tree.get("model") or {}) if scale else dict(tree.get("model") or {})
        if scale not in (None, *SCALES):
            raise self._error("scale", f"unknown scale '{scale}'; known: {', '.join(SCALES)}", point)
        study = None
        if "study" in tree:
            study = self._build(StudyConfig, tree["study"], "study", point, context)
            dims = self._build(ModelConfig, {**model, "moe": {}}, "model", point, context)
            model["moe"] = derive_moe(study, dict(model.get("moe") or {}), dims.d_ff, dims.n_layers, spec.expert_alignment)
        elif "moe" in model:
            self._check_alignment(model, point, context)
        trial_dict = {"model": model, "train": tree.get("train") or {}, "data": tree.get("data") or {}, "seed": seed}
        trial = self._build(TrialConfig, trial_dict, "", point, context)
        workers = spec.resources.workers
        if workers is not None and trial.accumulation_steps % workers:
            raise self._error("train.batch_tokens", f"{trial.accumulation_steps} micro-batches per step cannot be split "
                              f"over resources.workers = {workers}; make batch_tokens a multiple of "
                              f"{workers} * micro_batch_size * seq_len{context}", point)
        counts = count_params(trial.model)
        if spec.max_total_params is not None and counts.total > spec.max_total_params:
            raise Infeasible(f"{counts.total / 1e9:.2f}B total parameters exceed max_total_params {spec.max_total_params / 1e9:g}B")
        flops = counts.matched_flops_per_token
        tokens = trial.total_steps * trial.train.batch_tokens
        hw = _hardware(spec)
        train_flops = float(flops) * tokens
        choice = self._shape(trial, train_flops, point)
        sharding, memory = choice.sharding, choice.memory
        if sharding != trial.train.sharding:
            trial = TrialConfig.from_dict({**trial.to_dict(), "train": {**trial.train.to_dict(), "sharding": sharding}})
        return PlannedTrial(
            trial_id=trial_id(trial), config_id=config_id(trial), sweep=spec.name, method=spec.method,
            scale=scale or "custom", seed=seed,
            params=self._params(point, tree, study, trial), derived=_derived(trial.model),
            config=trial, active_params=counts.matched_active, total_params=counts.total,
            router_params=counts.active_router, flops_per_token=flops,
            router_flops_per_token=counts.router_flops_per_token, train_tokens=tokens,
            train_flops=train_flops, est_hours=choice.est_hours,
            hardware=hw.name, sharding=sharding, shape=choice.shape, memory=memory,
        )

    def _shape(self, trial: TrialConfig, train_flops: float, point: dict[str, Any]) -> ShapeChoice:
        """The trial's workers, sharding and memory estimate per GPU (`orchestrator.shapes`).
        Raises `Infeasible` with the reason when no allowed shape fits the sweep's GPU."""
        if "sharding" in (self.spec.base.get("train") or {}) or "train.sharding" in self.assignments(point):
            raise self._error("train.sharding", "train.sharding is chosen by the planner; set resources.sharding "
                              "(auto, none or fsdp) instead", point)
        return choose_shape(trial, train_flops, self.spec.resources, _hardware(self.spec))

    def _check_alignment(self, model: dict[str, Any], point: dict[str, Any], context: str) -> None:
        dims = self._build(ModelConfig, model, "model", point, context)
        for s in dims.moe.experts:
            width = s.granularity * dims.d_ff
            if round(width) % self.spec.expert_alignment:
                raise Infeasible(f"expert width {width:g} is not a multiple of expert_alignment {self.spec.expert_alignment}")

    def _build(self, cls: type, data: dict[str, Any], section: str, point: dict[str, Any], context: str) -> Any:
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            dotted = ".".join(p for p in (section, err.path) if p)
            raise self._error(dotted, err.detail + context, point) from None

    def _error(self, dotted: str, detail: str, point: dict[str, Any]) -> ConfigError:
        """Blame the parameter that set `dotted` (or a parent of it), else base's key."""
        for name, value in point.items():
            p = self.spec.parameters[name]
            keys = p.variants[value] if p.variants is not None else {name: value}
            for key in keys:
                if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                    path = ("parameters", name) + (("variants", value, key) if p.variants is not None else ())
                    return ConfigError(detail, where=f"{self.sweep.path}:{self.sweep.line(path)}", path=dotted)
        return ConfigError(detail, where=f"{self.sweep.path}:{self.sweep.line(self.sweep.key_path('base.' + dotted))}", path=dotted)

    def _params(self, point: dict[str, Any], tree: dict[str, Any], study: StudyConfig | None, trial: TrialConfig) -> dict[str, Any]:
        """The swept keys with their resolved values: what the trials table shows."""
        resolved = trial.to_dict()
        out = {}
        for name, value in point.items():
            p = self.spec.parameters[name]
            if p.variants is not None or name == "scale":
                out[name] = value
            elif name.startswith("study.") and study is not None:
                out[name] = _get_path({"study": study.to_dict()}, name)
            else:
                found = _get_path(resolved, name)
                out[name] = found if found is not None else value
        return out


def _python(value: Any) -> Any:
    """A numpy scalar drawn by Tune as the Python value a YAML would hold (configs, JSON, hashes)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _derived(model: ModelConfig) -> dict[str, Any]:
    moe = model.moe
    if not moe.is_moe:
        return {"layout": "dense", "num_experts": 0, "top_k": 0, "expert_width": model.d_ff, "shared_width": 0,
                "num_pools": 0, "block_size": 0}
    return {
        "layout": moe.layout,
        "num_experts": moe.num_routed_experts,
        "top_k": moe.top_k,
        "expert_width": "+".join(str(model.expert_width(s.granularity)) for s in moe.experts),
        "shared_width": model.shared_width,
        "num_pools": model.num_pools,
        "block_size": moe.router.block_size,
    }


def plan_sweep(sweep: SweepFile | str | Path) -> Plan:
    """Resolve every trial of a sweep (for bayes: a representative point only)."""
    sweep = sweep if isinstance(sweep, SweepFile) else SweepFile(sweep)
    planner = Planner(sweep)
    plan = Plan(spec=sweep.spec, path=sweep.path)
    if sweep.spec.method == "bayes":
        for seed in sweep.spec.seed_list[:1]:
            try:
                plan.estimate = planner.resolve(planner.central_point(), seed)
            except Infeasible:
                plan.estimate = None
        return plan
    points = list(planner.grid_points() if sweep.spec.method == "grid" else planner.random_points())
    seen: dict[str, PlannedTrial] = {}
    for point in points:
        for seed in sweep.spec.seed_list:
            try:
                trial = planner.resolve(point, seed)
            except Infeasible as why:
                plan.skipped.append(SkippedTrial(sweep.spec.name, seed, dict(point), str(why)))
                continue
            if trial.trial_id in seen:
                first = seen[trial.trial_id]
                reason = f"same resolved trial as {first.trial_id} ({_point_text(first.params)})"
                plan.skipped.append(SkippedTrial(sweep.spec.name, seed, trial.params, reason))
                continue
            seen[trial.trial_id] = trial
            plan.trials.append(trial)
    return plan


def sweep_files(path: str | Path) -> list[Path]:
    """A YAML file, or every *.yaml / *.yml under a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise ConfigError("no *.yaml sweep files in this folder", where=str(path))
        return files
    if not path.exists():
        raise ConfigError("no such file or folder", where=str(path))
    return [path]


def plan_path(path: str | Path) -> list[Plan]:
    """Plan one sweep file, or every sweep in a folder; sweep names must be unique."""
    plans: list[Plan] = []
    names: dict[str, Path] = {}
    for file in sweep_files(path):
        sweep = SweepFile(file)
        if sweep.spec.name in names:
            raise sweep.error(("name",), f"duplicate sweep name '{sweep.spec.name}' (also in {names[sweep.spec.name]})")
        names[sweep.spec.name] = file
        plans.append(plan_sweep(sweep))
    return plans
