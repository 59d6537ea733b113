"""The GlaS@MICCAI'2015 leaderboard with our results inserted, compared like with like.

    python -m keras_glas.leaderboard [RESULTS.json ...] [--png FILE] [--markdown FILE]

The shipped table (`keras_glas/resources/glas2015_leaderboard.csv`) holds the ten 2015 entries
with their published scores, computed with the challenge's official metrics, and the seed
study's two rows (DTU-UNET, DTU-MASKRCNN), computed with the seed's own metric helper
(`metric_protocol` = `seed`). Each RESULTS.json written by `python -m keras_glas.evaluate --json`
(`{"model", "dataset", "ground_truth", "test_a": {"f1", "object_dice", "object_hausdorff",
..., "seed": {...}}, "test_b": {...}}`) adds two rows: its official scores next to the 2015
entrants and its seed-compatible scores next to the seed's rows. The row name is `"model"`, or
the file name without `.json`.

Official scores computed against `"ground_truth": "binary_masks"` (instances reconstructed as
connected components of the binarised annotation, so touching glands merge; also inferred
from `"dataset": "glas/binary_masks"`) are labelled *approx.*; seed-compatible scores are exact
on either ground truth, since the seed's helper binarises anyway. Results on
`glas/synthetic` are labelled *synthetic*.

Ranking, per protocol table, is the challenge's: for each metric and test part a standard
competition rank ("1224": equal values share the best rank, the next rank skips), higher F1 and
Dice and lower Hausdorff being better, on values rounded to the published precision (3
decimals); the sum of the six ranks orders the table, and its own competition rank is the
place. The Markdown (for the README) is printed and optionally written; `--png` saves a bar
chart of both tables.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.resources
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

from keras_glas.atomic import atomic_path, write_text

SPLITS = {"test_a": "A", "test_b": "B"}
# (key in result JSONs, column prefix in the CSV, title, higher is better)
METRICS = (
    ("f1", "f1", "F1", True),
    ("object_dice", "object_dice", "Object Dice", True),
    ("object_hausdorff", "object_hausdorff", "Object Hausdorff", False),
)
COLUMNS = tuple(
    f"{prefix}_{part.lower()}" for _, prefix, _, _ in METRICS for part in SPLITS.values()
)
PROTOCOLS = {
    "official": "official GlaS metrics",
    "seed": "seed-study metrics",
}
DECIMALS = 3  # precision of the published figures; ranking compares values rounded to it
RESOURCE = "resources/glas2015_leaderboard.csv"


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaderboard entry.

    Attributes:
        name: method name as shown.
        protocol: `official` or `seed`, the metric protocol its numbers were computed with.
        scores: `{column: value}` for the six `COLUMNS` (`f1_a`, `f1_b`, `object_dice_a`, ...).
        ours: True for rows read from RESULTS.json files.
        note: short qualifier shown after the name (e.g. `approx.`), "" for none.
    """

    name: str
    protocol: str
    scores: dict
    ours: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        name = f"**{self.name}**" if self.ours else self.name
        return f"{name} ({self.note})" if self.note else name


@dataclasses.dataclass(frozen=True)
class RankedRow:
    """A `Row` with its per-column ranks, rank sum and place within its protocol table."""

    row: Row
    ranks: dict
    rank_sum: int
    place: int


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def load_reference_rows() -> list[Row]:
    """The shipped 2015 table: ten official entries and the seed's two rows (protocol seed)."""
    text = importlib.resources.files("keras_glas").joinpath(RESOURCE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = []
    for record in csv.DictReader(io.StringIO("\n".join(lines))):
        rows.append(
            Row(
                name=record["method"],
                protocol=record["metric_protocol"],
                scores={column: float(record[column]) for column in COLUMNS},
            )
        )
    return rows


def _split_scores(result: dict, path: Path, nested: str | None) -> dict:
    scores = {}
    for split, part in SPLITS.items():
        if split not in result:
            raise ValueError(
                f"{path}: no `{split}` scores; the leaderboard ranks both test parts, so "
                f"evaluate with `python -m keras_glas.evaluate MODEL --split all --json {path}`."
            )
        record = result[split] if nested is None else result[split].get(nested, {})
        for key, prefix, _, _ in METRICS:
            if key not in record:
                where = f"{split}.{nested}" if nested else split
                raise ValueError(f"{path}: `{where}` has no `{key}`; is it an evaluate JSON?")
            scores[f"{prefix}_{part.lower()}"] = float(record[key])
    return scores


def is_approximate(result: dict) -> bool:
    """True when official scores were computed against binarised, relabelled ground truth."""
    return result.get("ground_truth") == "binary_masks" or str(
        result.get("dataset", "")
    ).endswith("binary_masks")


def load_result_rows(path: str | os.PathLike) -> list[Row]:
    """The official and the seed-compatible row of one evaluate JSON.

    Args:
        path: a JSON file written by `python -m keras_glas.evaluate --json`.

    Returns:
        `[official_row, seed_row]`, named after `"model"` or the file name.

    Raises:
        ValueError: unreadable JSON, or a split / metric missing (naming the file).
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read results file {path}: {error}") from error
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a JSON object as written by keras_glas.evaluate")
    name = str(result.get("model") or path.stem)
    synthetic = "synthetic" in str(result.get("dataset", ""))
    seed_note = "synthetic data" if synthetic else ""
    official_note = seed_note or ("approx." if is_approximate(result) else "")
    return [
        Row(name, "official", _split_scores(result, path, None), ours=True, note=official_note),
        Row(name, "seed", _split_scores(result, path, "seed"), ours=True, note=seed_note),
    ]


# --------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------
def competition_ranks(values: Sequence[float], higher_is_better: bool) -> list[int]:
    """Standard competition ranks ("1224") of `values`: 1 + the number of strictly better ones.

    NaN (a missing value) ranks last.
    """
    keys = [
        math.inf if math.isnan(v) else (-v if higher_is_better else v) for v in values
    ]
    return [1 + sum(other < key for other in keys) for key in keys]


def rank_rows(rows: Sequence[Row]) -> list[RankedRow]:
    """Rank rows of one protocol with the challenge's rank-sum rule, best place first.

    Values are rounded to `DECIMALS` before ranking, the precision of the published table.
    """
    ranks = {row_index: {} for row_index in range(len(rows))}
    for _, prefix, _, higher in METRICS:
        for part in SPLITS.values():
            column = f"{prefix}_{part.lower()}"
            values = [round(row.scores[column], DECIMALS) for row in rows]
            for index, rank in enumerate(competition_ranks(values, higher)):
                ranks[index][column] = rank
    sums = [sum(ranks[index].values()) for index in range(len(rows))]
    places = competition_ranks(sums, higher_is_better=False)
    ranked = [
        RankedRow(row=row, ranks=ranks[index], rank_sum=sums[index], place=places[index])
        for index, row in enumerate(rows)
    ]
    return sorted(ranked, key=lambda r: (r.place, not r.row.ours, r.row.name))


def build_tables(result_paths: Sequence[str | os.PathLike] = ()) -> dict[str, list[RankedRow]]:
    """`{protocol: ranked rows}` of the shipped table plus the rows of each result file."""
    rows = load_reference_rows()
    for path in result_paths:
        rows.extend(load_result_rows(path))
    return {
        protocol: rank_rows([row for row in rows if row.protocol == protocol])
        for protocol in PROTOCOLS
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def markdown_table(protocol: str, ranked: Sequence[RankedRow]) -> str:
    """One Markdown table; every metric column names the protocol its numbers come from."""
    tag = "official" if protocol == "official" else "seed metric"
    headers = ["Place", "Method"] + [
        f"{title} {part} [{tag}]" for _, _, title, _ in METRICS for part in SPLITS.values()
    ] + ["Rank sum"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 7) + "|"]
    for entry in ranked:
        cells = [str(entry.place), entry.row.label]
        for column in COLUMNS:
            cells.append(f"{entry.row.scores[column]:.{DECIMALS}f} ({entry.ranks[column]})")
        cells.append(str(entry.rank_sum))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaderboard_markdown(tables: dict[str, list[RankedRow]]) -> str:
    """Both tables with headings and the notes a reader needs to compare like with like."""
    parts = []
    notes = {
        "official": "The 2015 entries as published by the challenge; our rows computed with "
        "`keras_glas.metrics.glas_scores` (pooled over each test part). *approx.*: scored "
        "against binarised annotations relabelled into connected components (touching glands "
        "merge), so only approximately comparable.",
        "seed": "The seed study's rows as it reported them, computed with its own helper "
        "(binarised and relabelled masks, pixel F1, cropped Hausdorff, per-image means); our "
        "rows with `keras_glas.metrics.seed_compatible_scores`, which reproduces it. Not "
        "comparable with the official table.",
    }
    for protocol, title in PROTOCOLS.items():
        parts.append(f"### GlaS 2015 leaderboard, {title}\n")
        parts.append(notes[protocol] + " Cells: score (rank); place by the sum of the six "
                     "ranks (challenge rule, 1224 ranking).\n")
        parts.append(markdown_table(protocol, tables[protocol]) + "\n")
    return "\n".join(parts)


def save_bar_chart(tables: dict[str, list[RankedRow]], path: str | os.PathLike) -> None:
    """PNG: one row of panels per protocol, one panel per metric, bars for test A and B.

    Methods are ordered by place; our rows are drawn in a different colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    legend = [Patch(color="#4c72b0", label="test A"), Patch(color="#8fb0d9", label="test B")]

    figure, axes = plt.subplots(
        len(PROTOCOLS), len(METRICS), figsize=(16, 9), squeeze=False, constrained_layout=True
    )
    for row_axes, (protocol, title) in zip(axes, PROTOCOLS.items(), strict=True):
        ranked = tables[protocol]
        positions = list(range(len(ranked)))
        for axis, (_, prefix, metric_title, higher) in zip(row_axes, METRICS, strict=True):
            for offset, part, colours in ((-0.2, "A", ("#4c72b0", "#dd8452")),
                                          (0.2, "B", ("#8fb0d9", "#f2b98c"))):
                values = [entry.row.scores[f"{prefix}_{part.lower()}"] for entry in ranked]
                colour = [colours[1] if entry.row.ours else colours[0] for entry in ranked]
                axis.bar([p + offset for p in positions], values, width=0.4, color=colour)
            axis.set_xticks(positions)
            axis.set_xticklabels(
                [entry.row.name + (f" ({entry.row.note})" if entry.row.note else "")
                 for entry in ranked], rotation=60, ha="right", fontsize=8)
            better = "higher" if higher else "lower"
            axis.set_title(f"{metric_title} [{title}], {better} is better", fontsize=9)
            axis.legend(handles=legend, fontsize=7)
    figure.suptitle("GlaS@MICCAI'2015 leaderboard (ours in orange; light bars: test B)")
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m keras_glas.leaderboard",
        description="GlaS 2015 leaderboard with our results, one table per metric protocol.",
    )
    parser.add_argument("results", nargs="*", metavar="RESULTS.json",
                        help="JSON files written by `python -m keras_glas.evaluate --json`")
    parser.add_argument("--png", metavar="FILE", help="save a bar chart of both tables")
    parser.add_argument("--markdown", metavar="FILE", help="also write the Markdown to FILE")
    args = parser.parse_args(argv)
    try:
        tables = build_tables(args.results)
    except ValueError as error:
        parser.error(str(error))
    text = leaderboard_markdown(tables)
    print(text)
    if args.markdown:
        write_text(args.markdown, text)
    if args.png:
        save_bar_chart(tables, args.png)
        print(f"bar chart written to {args.png}")
    return text


if __name__ == "__main__":
    main()
