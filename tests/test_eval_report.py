"""`vlmkit eval report`: a Markdown table across runs (hand-computed cells) and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.eval.benchmarks import build_benchmark
from vlmkit.eval.report import markdown_table
from vlmkit.eval.runner import score_predictions


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    labels = ["yes", "no", "yes", "no"]
    data = tmp_path / "pope.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "x.png", "text": "Is there a cat?", "label": lab}) + "\n"
            for i, lab in enumerate(labels)
        )
    )
    runs = []
    for name, answers in (("run_a", ["Yes"] * 4), ("run_b", ["Yes", "No", "Yes", "No"])):
        preds = tmp_path / f"{name}.jsonl"
        preds.write_text(
            "".join(json.dumps({"question_id": i, "answer": a}) + "\n" for i, a in enumerate(answers))
        )
        score_predictions(build_benchmark("pope", data), preds, tmp_path / name)
        runs.append(tmp_path / name)
    return runs[0], runs[1]


def test_report_cli_table_and_chart(two_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    run_a, run_b = two_runs
    capsys.readouterr()
    assert (
        main(["eval", "report", str(run_a), str(run_b / "results.json"), "--out", str(tmp_path / "rep")]) == 0
    )
    printed = capsys.readouterr().out
    expected = (
        "| run | benchmark | accuracy | precision | recall | f1 | yes_ratio |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
        "| run_a | pope | 0.5000 | 0.5000 | 1.0000 | 0.6667 | 1.0000 |\n"  # all "yes": f1 = 2*.5*1/1.5
        "| run_b | pope | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 0.5000 |\n"
    )
    assert expected in printed
    assert (tmp_path / "rep" / "report.md").read_text() == expected
    png = tmp_path / "rep" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] >= 600 and im.size[1] == 450  # figsize (>=6, 4.5) at 100 dpi


def test_report_metric_selection_and_missing_cells() -> None:
    results = [
        {"benchmark": "pope", "metrics": {"f1": 0.25, "n": 4}},
        {"benchmark": "mme", "metrics": {"total": 1234.5}},
    ]
    table = markdown_table(results, ["a", "b"])
    assert table.splitlines()[0] == "| run | benchmark | f1 | total |"  # counts (n) left out
    assert table.splitlines()[2] == "| a | pope | 0.2500 | – |"
    assert table.splitlines()[3] == "| b | mme | – | 1234.50 |"
    assert markdown_table(results, ["a", "b"], ["n"]).splitlines()[2] == "| a | pope | 4 |"
