"""The `moe-sweep` command: accounting output, one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from moe_core.yaml_io import load_model_config
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert load_model_config(path).n_layers > 0


def test_describe_prints_the_accounting(capsys):
    assert main(["describe", str(ROOT / "configs" / "unipool_182m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "776,450,316" in out  # total parameters of UniPool-182M as this project counts them


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  vocab_size: 10\n  d_model: 32\n  n_layers: 2\n  n_heads: 4\n  d_ff: 64\n"
         "  moe: {layout: layerwise, experts: [{num_experts: 4, top_k: 5}]}\n",
         "model.moe.experts.0: top_k (5) must be <= num_experts (4)"),
        ("model:\n  vocab_size: 10\n  d_modle: 32\n", "model.d_modle: unknown key; did you mean 'd_model'?"),
        ("model:\n  moe: {routr: {}}\n", "model.moe.routr: unknown key; did you mean 'router'?"),
        ("model: [\n", "line 2: invalid YAML"),
        ("train: {}\n", "model: required key is missing"),
    ],
)
def test_describe_rejects_bad_files_with_one_line_and_status_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "describe", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr and str(path) in proc.stderr


def test_missing_file_is_a_clean_error(tmp_path, capsys):
    assert main(["describe", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_demo_trains_every_family(capsys):
    from orchestrator.demo import run_demo

    rows = run_demo(steps=3)
    assert [r["name"] for r in rows] == ["dense", "vanilla", "unipool 1/4", "pathmoe B=2"]
    dense_ffn = 3 * 64 * 128 * 4  # d_model * d_ff SwiGLU in 4 layers
    assert all(r["counts"].active_expert == dense_ffn for r in rows[1:])  # FLOP-matched MoEs
    assert "synthetic task, 3 steps" in capsys.readouterr().out
