"""keras_glas.atomic: writes replace the file whole or leave it untouched."""

import json
import math
import os

import pytest

from keras_glas.atomic import atomic_path, write_json, write_text


def test_write_json_creates_parents_and_round_trips(tmp_path):
    path = tmp_path / "a" / "b" / "scores.json"
    write_json(path, {"f1": 0.5, "hausdorff": math.nan, "names": ["x"]})
    data = json.loads(path.read_text())
    assert data["f1"] == 0.5 and math.isnan(data["hausdorff"]) and data["names"] == ["x"]
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.json"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "table.md"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as temp:
            temp.write_text("half a ta")
            raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_unserialisable_json_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_temp_path_is_a_hidden_sibling_with_the_requested_suffix(tmp_path):
    path = tmp_path / "best.weights.h5"
    with atomic_path(path, suffix=".weights.h5") as temp:
        assert temp.parent == tmp_path
        assert temp.name.startswith(".best.weights.h5.") and temp.name.endswith(".weights.h5")
        temp.write_bytes(b"weights")
    assert path.read_bytes() == b"weights"


def test_written_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
