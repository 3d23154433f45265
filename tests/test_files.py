"""Atomic writes (moe_core.files), the shared GPU peak table, and the torch-free imports that the
analysis layer relies on."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_core.devices import gpu_peak_flops
from moe_core.files import atomic_dir, atomic_path, move_into_place, write_json, write_parquet, write_text
from tests.deps import require


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary
    out.mkdir()  # an empty placeholder is replaced
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == []
        (tmp / "model.bin").write_bytes(b"ok")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (out / "model.bin").read_bytes() == b"ok"


def test_moving_into_place_never_deletes_a_folder_with_files_unless_told(tmp_path):
    kept, new = tmp_path / "kept", tmp_path / "new"
    kept.mkdir(), new.mkdir()
    (kept / "user.txt").write_text("mine")
    with pytest.raises(OSError):
        move_into_place(new, kept)
    assert (kept / "user.txt").read_text() == "mine" and new.is_dir()
    (new / "step.pt").write_text("try 2")
    move_into_place(new, kept, over_earlier=True)  # a checkpoint's earlier try at the same step
    assert sorted(p.name for p in kept.iterdir()) == ["step.pt"] and not new.exists()


def test_parquet_rows_union_columns_schema_and_nan_as_null(tmp_path):
    path = tmp_path / "sub" / "rows.parquet"
    write_parquet(path, [{"a": 1.0, "b": None}, {"a": float("nan"), "c": "x"}], {"seed": pa.int64()})
    table = pq.read_table(path)
    assert table.column_names == ["seed", "a", "b", "c"]
    assert table.schema.field("seed").type == pa.int64() and table.schema.field("b").type == pa.string()
    assert table.to_pylist() == [{"seed": None, "a": 1.0, "b": None, "c": None}, {"seed": None, "a": None, "b": None, "c": "x"}]


def test_gpu_peaks_by_device_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA L40S") == 362e12  # not L4's
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12  # not A10's
    assert gpu_peak_flops("NVIDIA A10") == 125e12
    assert gpu_peak_flops("Some Future GPU") is None


def test_analysis_and_the_file_helpers_import_without_torch():
    require("matplotlib")  # analysis.report draws its figures with it
    code = "import sys, moe_core.files, moe_core.devices, analysis.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
