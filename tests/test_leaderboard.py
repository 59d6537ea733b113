"""Leaderboard: shipped table, 1224 ranking, rank-sum order, result files and the CLI."""

import json
import math

import pytest

from keras_glas import leaderboard


def result_json(tmp_path, name="ours.json", **top_level):
    """An evaluate-style JSON: official scores and the seed-compatible ones per split."""
    payload = {
        "test_a": {"f1": 0.9124, "object_dice": 0.95, "object_hausdorff": 30.0, "count": 0.9,
                   "seed": {"f1": 0.95, "object_dice": 0.93, "object_hausdorff": 30.0,
                            "count": 0.9}},
        "test_b": {"f1": 0.80, "object_dice": 0.85, "object_hausdorff": 100.0, "count": 0.8,
                   "seed": {"f1": 0.91, "object_dice": 0.80, "object_hausdorff": 80.0,
                            "count": 0.8}},
        **top_level,
    }
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return path


def test_competition_ranks_are_1224():
    ranks = leaderboard.competition_ranks([0.9, 0.8, 0.9, 0.7], higher_is_better=True)
    assert ranks == [1, 3, 1, 4]
    assert leaderboard.competition_ranks([10.0, 20.0, 10.0], higher_is_better=False) == [1, 3, 1]
    assert leaderboard.competition_ranks([math.nan, 1.0], higher_is_better=True) == [2, 1]


def test_shipped_table_is_read_with_its_protocols():
    rows = {row.name: row for row in leaderboard.load_reference_rows()}
    assert len(rows) == 12
    assert sum(row.protocol == "official" for row in rows.values()) == 10
    assert {name for name, row in rows.items() if row.protocol == "seed"} == {
        "DTU-UNET", "DTU-MASKRCNN"}
    assert rows["CUMedVision2"].scores["f1_a"] == 0.912
    assert rows["LIB"].scores["object_hausdorff_b"] == 190.447


def test_official_table_ranks_ties_1224_and_orders_by_rank_sum():
    ranked = leaderboard.build_tables()["official"]
    by_name = {entry.row.name: entry for entry in ranked}
    # Dice B: CUMedVision1 0.800 first, ExB1 and Freiburg2 tie at 0.786 -> both 2nd, and the
    # next one (Freiburg1, 0.783) is 4th, not 3rd.
    assert by_name["CUMedVision1"].ranks["object_dice_b"] == 1
    assert by_name["ExB1"].ranks["object_dice_b"] == 2
    assert by_name["Freiburg2"].ranks["object_dice_b"] == 2
    assert by_name["Freiburg1"].ranks["object_dice_b"] == 4
    sums = [entry.rank_sum for entry in ranked]
    assert sums == sorted(sums)
    assert ranked[0].row.name == "CUMedVision2"  # the 2015 winner
    assert all(entry.rank_sum == sum(entry.ranks.values()) for entry in ranked)


def test_result_rows_join_their_own_protocol_table(tmp_path):
    path = result_json(tmp_path, model="keras-glas U-Net", ground_truth="binary_masks")
    tables = leaderboard.build_tables([path])
    official = {entry.row.name: entry for entry in tables["official"]}
    seed = {entry.row.name: entry for entry in tables["seed"]}
    ours = official["keras-glas U-Net"]
    assert ours.row.ours and ours.row.note == "approx."
    # 0.9124 rounds to the published 0.912: a tie with CUMedVision2 for first, ExB3 third.
    assert ours.ranks["f1_a"] == official["CUMedVision2"].ranks["f1_a"] == 1
    assert official["ExB3"].ranks["f1_a"] == 3
    assert ours.row.scores["object_dice_a"] == 0.95 and ours.ranks["object_dice_a"] == 1
    # The seed row sits with the seed's two rows only, and is exact (no note).
    assert set(seed) == {"keras-glas U-Net", "DTU-UNET", "DTU-MASKRCNN"}
    assert seed["keras-glas U-Net"].row.note == ""
    assert seed["keras-glas U-Net"].row.scores["f1_a"] == 0.95
    assert seed["keras-glas U-Net"].ranks["f1_a"] == 1  # 0.95 > DTU-MASKRCNN's 0.922


def test_row_name_falls_back_to_the_file_stem(tmp_path):
    rows = leaderboard.load_result_rows(result_json(tmp_path, name="unet_cpu.json"))
    assert [row.name for row in rows] == ["unet_cpu", "unet_cpu"]
    assert [row.protocol for row in rows] == ["official", "seed"]
    assert rows[0].note == ""  # no binary_masks ground truth: exact official scores


def test_cli_prints_markdown_and_writes_markdown_and_png(tmp_path, capsys):
    path = result_json(tmp_path, model="my-unet", dataset="glas/binary_masks")
    png, markdown = tmp_path / "out" / "board.png", tmp_path / "board.md"
    text = leaderboard.main([str(path), "--png", str(png), "--markdown", str(markdown)])
    printed = capsys.readouterr().out
    assert text in printed
    assert markdown.read_text() == text
    official, seed = text.split("seed-study metrics")
    assert "| **my-unet** (approx.) |" in official and "F1 A [official]" in official
    assert "| **my-unet** |" in seed and "Object Hausdorff B [seed metric]" in seed
    assert "CUMedVision2" in official and "CUMedVision2" not in seed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("out/.*tmp"))  # no temp file left behind


def test_cli_rejects_a_result_without_both_parts(tmp_path, capsys):
    path = tmp_path / "half.json"
    path.write_text(json.dumps({"test_a": {"f1": 1.0, "object_dice": 1.0,
                                           "object_hausdorff": 0.0, "seed": {}}}))
    with pytest.raises(SystemExit):
        leaderboard.main([str(path)])
    assert "--split all" in capsys.readouterr().err
