"""Starting or joining Ray for one sweep, and cleaning up after a driver that was killed.

Local by default: a Ray instance sized to the machine with its dashboard on 127.0.0.1. With an
address (`auto`, `host:port` or `ray://host:port`) the driver joins a cluster started with
`ray start`. A driver killed with SIGKILL leaves the Ray processes it started running; the PIDs
(with their start times, so a reused PID is never touched) are recorded in the sweep folder and
the next run of the same sweep stops exactly those, never processes found by name.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from moe_core.files import write_json


@dataclass
class RaySession:
    dashboard_url: str | None
    started_here: bool
    num_cpus: float


def auth_token_path() -> str:
    """Where Ray 2.60 keeps the token its dashboard's REST API asks for (local runs too): the
    file `RAY_AUTH_TOKEN_PATH` names, else ~/.ray/auth_token."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def _recorded(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def recorded_process(pid: int, create_time: float) -> psutil.Process | None:
    """The process `pid` if it is still the one recorded (same creation time), else None: PIDs
    are reused, and a recorded PID may belong to an unrelated process by now."""
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - create_time) <= 0.01 else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
        return None


def cleanup_orphans(pid_file: Path) -> int:
    """Stop the Ray processes a previous (killed) driver of this sweep started; returns how many."""
    stopped = []
    for entry in _recorded(pid_file):
        proc = recorded_process(entry.get("pid", -1), entry.get("create_time"))
        if proc is None:
            continue
        try:
            proc.terminate()
            stopped.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(stopped, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    pid_file.unlink(missing_ok=True)
    return len(stopped)


def _record_children(pid_file: Path) -> None:
    me = psutil.Process()
    entries = []
    for child in me.children(recursive=True):
        try:
            entries.append({"pid": child.pid, "create_time": child.create_time(), "name": child.name()})
        except psutil.NoSuchProcess:
            continue
    write_json(pid_file, entries)


def start_ray(address: str | None, num_cpus: float | None, pid_file: Path, dashboard: bool = True) -> RaySession:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if address:
        ctx = ray.init(address=address, **common)
        started = False
    else:
        ctx = ray.init(
            num_cpus=int(num_cpus) if num_cpus else None, include_dashboard=dashboard,
            dashboard_host="127.0.0.1", **common,
        )
        started = True
        _record_children(pid_file)
    url = getattr(ctx, "dashboard_url", None)
    return RaySession(
        dashboard_url=f"http://{url}" if url and not url.startswith("http") else url,
        started_here=started, num_cpus=ray.cluster_resources().get("CPU", 0.0),
    )


def stop_ray(session: RaySession, pid_file: Path) -> None:
    import ray

    ray.shutdown()
    if session.started_here:
        time.sleep(0.2)
        cleanup_orphans(pid_file)  # anything ray.shutdown left behind
