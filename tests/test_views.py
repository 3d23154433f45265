"""What a user reads while a sweep runs: trial labels in the live view, and `status`'s time line
(no Ray here: the views are fed by hand)."""

import io
import os
import time

import psutil
from rich.console import Console

from orchestrator.live_view import LiveView, trial_label
from orchestrator.ray_session import recorded_process
from orchestrator.status import _time_line


def test_trial_labels_show_the_swept_values():
    assert trial_label({"arch": "moe_g1", "study.granularity": 0.25}, seed=2) == "arch=moe_g1, granularity=0.25, seed=2"
    out = io.StringIO()
    view = LiveView(Console(file=out, width=200), "s", 2, "val_loss", "minimize", None)
    view.label("204d9bf75d63", {"arch": "moe_g1"})
    with view:
        view.finished("204d9bf75d63", "completed", {"val_loss": 5.7608})
        view.finished("aaaaaaaaaaaa", "failed", None)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] arch=moe_g1 (204d9bf75d63) completed val_loss 5.7608"
    assert lines[1] == "[2/2] aaaaaaaaaaaa failed"  # unlabelled (bayes before its first result): the id
    text = Console(file=io.StringIO(), width=200, record=True)
    text.print(view.render())
    assert "best val_loss: 5.7608: arch=moe_g1 (204d9bf75d63)" in text.export_text()


def test_status_says_time_left_in_every_state():
    now = time.time()
    driver = {"started": now - 600, "finished_before": 2, "est_hours": 0.5}
    assert "time left about 10.0 min for 4 trials" in _time_line(driver, True, planned=10, done=6)  # 4 in 10 min
    assert "time left unknown until a trial of this run finishes: the plan estimated 30.0 min" in _time_line(driver, True, 10, 2)
    assert "8 trials left (`moe-sweep run` on the sweep's YAML resumes them)" in _time_line(driver, False, 10, 2)
    assert _time_line(driver, False, 10, 10).endswith("every trial has finished")
    assert _time_line({}, False, 10, 3) == "7 trials left"


def test_a_reused_pid_is_not_taken_for_the_recorded_process():
    me = psutil.Process()
    assert recorded_process(os.getpid(), me.create_time()) is not None
    assert recorded_process(os.getpid(), me.create_time() - 60) is None  # same PID, another process
    assert recorded_process(os.getpid(), None) is None
