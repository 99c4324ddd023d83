"""Benchmark adapters on hand-made files and predictions, scored without a model, vs hand-computed metrics."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from vlmkit.cli import main
from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks import BENCHMARKS, build_benchmark
from vlmkit.eval.runner import load_predictions, score_predictions
from vlmkit.shapesworld.scoring import score_shapesworld

from conftest import random_image


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score_cli(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "score", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------------ POPE
def test_pope_score_cli_per_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [
        (1, "random", "yes", "Yes, there is."),  # TP
        (2, "random", "no", "No."),  # TN
        (3, "random", "no", "There is a dog"),  # FP
        (4, "popular", "yes", "no"),  # FN
        (5, "popular", "yes", "Yes"),  # TP
        (6, "popular", "no", "I do not think so."),  # TN
    ]
    data = _jsonl(
        tmp_path / "pope.jsonl",
        [
            {
                "question_id": q,
                "image": f"{q}.jpg",
                "text": f"Is there a thing {q}?",
                "label": lab,
                "category": c,
            }
            for q, c, lab, _ in rows
        ],
    )
    # LLaVA-style answer file: the answer is under "text"
    preds = _jsonl(tmp_path / "answers.jsonl", [{"question_id": q, "text": a} for q, _, _, a in rows])
    out = _score_cli(capsys, "--benchmark", "pope", "--data", str(data), "--predictions", str(preds))
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3) and out["yes_ratio"] == pytest.approx(0.5)
    assert out["random_precision"] == pytest.approx(0.5) and out["random_recall"] == 1.0
    assert out["random_yes_ratio"] == pytest.approx(2 / 3)
    assert out["popular_precision"] == 1.0 and out["popular_recall"] == 0.5
    assert out["popular_accuracy"] == pytest.approx(2 / 3)


def test_pope_official_rule_by_default_lenient_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = [(1, "no", "NO"), (2, "no", "Not really."), (3, "yes", "Yes, there is.")]
    data = _jsonl(
        tmp_path / "pope.jsonl",
        [{"question_id": q, "image": "x.jpg", "text": "Is there a cat?", "label": lab} for q, lab, _ in rows],
    )
    preds = _jsonl(tmp_path / "answers.jsonl", [{"question_id": q, "text": a} for q, _, a in rows])
    args = ("--benchmark", "pope", "--data", str(data), "--predictions", str(preds))
    official = _score_cli(capsys, *args, "--out", str(tmp_path / "official"))
    assert official["yes_ratio"] == 1.0  # "NO" and "Not really." are "yes" by the official rule
    lenient = _score_cli(capsys, *args, "--out", str(tmp_path / "lenient"), "--lenient")
    assert lenient["yes_ratio"] == pytest.approx(1 / 3) and lenient["accuracy"] == 1.0
    for name, rule in (("official", "official"), ("lenient", "lenient")):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["provenance"]["benchmark"]["answer_rule"] == rule
        assert results["info"]["answer_rule"].startswith(rule)


def test_pope_directory_of_split_files(tmp_path: Path) -> None:
    pope = tmp_path / "pope"
    pope.mkdir()
    for split in ("random", "adversarial"):  # official layout: JSON lines in a .json file, no category field
        _jsonl(
            pope / f"coco_pope_{split}.json",
            [
                {"question_id": q, "image": "x.jpg", "text": "Is there a cat?", "label": lab}
                for q, lab in ((1, "yes"), (2, "no"))
            ],
        )
    bench = build_benchmark("pope", pope)
    assert sorted(it.key for it in bench.items()) == [
        "adversarial/1",
        "adversarial/2",
        "random/1",
        "random/2",
    ]
    preds = {
        "random/1": {"answer": "yes"},
        "random/2": {"answer": "no"},
        "adversarial/1": {"answer": "no"},
        "adversarial/2": {"answer": "no"},
    }
    out = bench.score(bench.items(), preds)
    assert out["random_accuracy"] == 1.0 and out["adversarial_accuracy"] == 0.5 and out["accuracy"] == 0.75
    assert bench.items()[0].prompt.endswith("Answer the question using a single word or phrase.")


# ------------------------------------------------------------------------------------------------------- MME
def test_mme_jsonl_and_release_directory(tmp_path: Path) -> None:
    rows = [
        ("existence", "1.png", "Yes", "Yes"),
        ("existence", "1.png", "No", "No"),
        ("existence", "2.png", "Yes", "Yes"),
        ("existence", "2.png", "No", "Yes"),
        ("code_reasoning", "3.png", "Yes", "No"),
        ("code_reasoning", "3.png", "No", "No"),
    ]
    data = _jsonl(
        tmp_path / "mme.jsonl",
        [
            {
                "question_id": f"q{i}",
                "image": img,
                "question": "Is it? Please answer yes or no.",
                "answer": gold,
                "category": task,
            }
            for i, (task, img, gold, _) in enumerate(rows)
        ],
    )
    bench = build_benchmark("mme", data)
    out = bench.score(bench.items(), {f"q{i}": {"answer": a} for i, (*_, a) in enumerate(rows)})
    # existence: acc 3/4, acc+ 1/2 -> 125; code_reasoning: acc 1/2, acc+ 0 -> 50
    assert out["existence_score"] == pytest.approx(125.0)
    assert out["code_reasoning_score"] == pytest.approx(50.0)
    assert (out["perception"], out["cognition"]) == (pytest.approx(125.0), pytest.approx(50.0))

    release = tmp_path / "MME"
    (release / "count").mkdir(parents=True)  # images next to the question files
    random_image(0).save(release / "count" / "a.png")
    (release / "count" / "a.txt").write_text("How many? Two?\tYes\nHow many? Three?\tNo\n")
    (release / "artwork" / "images").mkdir(parents=True)  # images/ + questions_answers_YES_or_NO/
    (release / "artwork" / "questions_answers_YES_or_NO").mkdir()
    random_image(1).save(release / "artwork" / "images" / "b.jpg")
    (release / "artwork" / "questions_answers_YES_or_NO" / "b.txt").write_text(
        "Is it a Monet?\tNo\nA Degas?\tYes\n"
    )
    bench = build_benchmark("mme", release)
    items = {it.key: it for it in bench.items()}
    assert set(items) == {"artwork/b.jpg/0", "artwork/b.jpg/1", "count/a.png/0", "count/a.png/1"}
    assert (
        items["artwork/b.jpg/1"].images == ["artwork/images/b.jpg"]
        and items["artwork/b.jpg/1"].target == "Yes"
    )
    assert bench.request(items["count/a.png/0"]).images[0].size == (40, 30)
    preds = {
        "count/a.png/0": {"answer": "yes"},
        "count/a.png/1": {"answer": "no"},
        "artwork/b.jpg/0": {"answer": "no"},
        "artwork/b.jpg/1": {"answer": "no"},
    }
    out = bench.score(bench.items(), preds)
    assert out["count_score"] == pytest.approx(200.0) and out["artwork_score"] == pytest.approx(50.0)
    assert out["perception"] == pytest.approx(250.0) and out["cognition"] == 0.0


# ----------------------------------------------------------------------------------------------------- VQAv2
def test_vqav2_official_files_soft_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "How many dogs?", "question_id": 420},
            {"image_id": 43, "question": "What animal?", "question_id": 430},
        ],
    }
    answers_430 = ["cat"] * 2 + ["dog"] * 8
    annotations = {
        "annotations": [
            {
                "question_id": 420,
                "image_id": 42,
                "answer_type": "number",
                "answers": [{"answer": "2", "answer_id": i + 1} for i in range(10)],
            },
            {
                "question_id": 430,
                "image_id": 43,
                "answer_type": "other",
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers_430)],
            },
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    bench = build_benchmark("vqav2", tmp_path / "q.json", annotations=tmp_path / "a.json")
    assert bench.items()[0].images == ["COCO_val2014_000000000042.jpg"]
    preds = _jsonl(
        tmp_path / "p.jsonl", [{"question_id": 420, "answer": "Two."}, {"question_id": 430, "answer": "cat"}]
    )
    out = _score_cli(
        capsys,
        "--benchmark",
        "vqav2",
        "--data",
        str(tmp_path / "q.json"),
        "--annotations",
        str(tmp_path / "a.json"),
        "--predictions",
        str(preds),
    )
    assert out["accuracy_number"] == pytest.approx(1.0)
    assert out["accuracy_other"] == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert out["accuracy"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------- multiple choice
def test_multiple_choice_layouts_and_extraction(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [
        {"question_id": 1, "question": "Which animal?", "options": ["dog", "cat"], "answer": "B"},
        {
            "question_id": 2,
            "question": "Which?",
            "A": "cat",
            "B": "dog",
            "C": "cow",
            "answer": "A",
            "category": "animals",
            "hint": "Look closely.",
        },
        {"question_id": 3, "question": "Which color?", "choices": ["red", "blue", "green"], "answer": 2},
        {
            "question_id": 4,
            "question": "Is it?",
            "options": {"A": "yes", "B": "no"},
            "answer": "A",
            "category": "animals",
        },
    ]
    data = _jsonl(tmp_path / "mc.jsonl", rows)
    answers = {1: "The answer is (B).", 2: "b) dog", 3: "It is green.", 4: "I cannot tell"}
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": q, "answer": a} for q, a in answers.items()])
    bench = build_benchmark("mmbench", data)
    item2 = bench.items()[1]
    assert item2.prompt == (
        "Look closely.\nWhich?\nA. cat\nB. dog\nC. cow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [it.target for it in bench.items()] == ["B", "A", "C", "A"]
    out = _score_cli(
        capsys, "--benchmark", "multiple-choice", "--data", str(data), "--predictions", str(preds)
    )
    assert out["accuracy"] == 0.5 and out["unparsed"] == 0.25
    assert out["accuracy_animals"] == 0.0


def test_mmbench_tsv_with_base64_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    random_image(3, (20, 10)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "mmb.tsv").write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
        f"7\tWhat is shown?\tnan\tnoise\ta cat\t\t\tA\tperception\t{b64}\n"
    )
    bench = build_benchmark("mmbench", tmp_path / "mmb.tsv")
    (item,) = bench.items()
    assert item.question_id == "7" and item.meta["options"] == {"A": "noise", "B": "a cat"}
    assert bench.request(item).images[0].size == (20, 10)


# -------------------------------------------------------------------------------------------------- grounding
def test_grounding_acc50_from_text_and_boxes(tmp_path: Path) -> None:
    rows = [
        {
            "question_id": 1,
            "image": "i.jpg",
            "text": "the dog",
            "bbox": [10, 20, 30, 40],
            "width": 100,
            "height": 100,
        },
        {
            "question_id": 2,
            "image": "i.jpg",
            "text": "the cat",
            "bbox": [0, 0, 50, 50],
            "width": 100,
            "height": 100,
        },
        {
            "question_id": 3,
            "image": "i.jpg",
            "text": "the cow",
            "bbox": [50, 50, 50, 50],
            "width": 100,
            "height": 100,
        },
        {
            "question_id": 4,
            "image": "i.jpg",
            "text": "the owl",
            "bbox": [50, 50, 50, 50],
            "width": 100,
            "height": 100,
        },
    ]
    data = _jsonl(tmp_path / "refcoco.jsonl", rows)
    preds = _jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "question_id": 1,
                "answer": "<ref>the dog</ref><box>(100,200),(400,600)</box>",
            },  # Qwen bins: IoU 1
            {"question_id": 2, "answer": "the cat [0, 0, 50, 25]"},  # pixels: IoU 0.5 counts
            {"question_id": 3, "answer": "I can't see it"},  # no box: wrong
            {"question_id": 4, "answer": "ignored text", "box": [60, 60, 100, 100]},  # our own runs: IoU 0.64
        ],
    )
    results = score_predictions(build_benchmark("refcoco", data), preds, tmp_path / "out")
    m = results["metrics"]
    assert m["acc50"] == 0.75 and m["no_box"] == 0.25
    assert m["mean_iou"] == pytest.approx((1 + 0.5 + 0 + 0.64) / 4)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]["acc50"] == 0.75
    assert build_benchmark("grounding", data).items()[0].prompt == "Give the bounding box of the dog."


# --------------------------------------------------------------------------------------------------- captions
def test_captioning_coco_json_with_coco_results_predictions(tmp_path: Path) -> None:
    refs = {
        1: ["A man riding a horse.", "A person on a horse."],
        2: ["Two cats on a couch.", "Cats sleeping."],
    }
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": k, "id": 10 * k + i, "caption": c} for k, v in refs.items() for i, c in enumerate(v)
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    cands = {1: "A man rides a horse.", 2: "Two cats sleep on a couch."}
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": k, "caption": c} for k, c in cands.items()]))
    bench = build_benchmark("coco-captions", tmp_path / "captions.json", tokenizer="python")
    results = score_predictions(bench, tmp_path / "res.json")
    expected, _ = M.caption_metrics(
        {str(k): v for k, v in refs.items()}, {str(k): c for k, c in cands.items()}, "python"
    )
    assert (
        results["metrics"]["bleu4"] == expected["bleu4"] and results["metrics"]["cider"] == expected["cider"]
    )
    assert results["info"]["caption_tokenizer"] == "python" and "java" in results["info"]["note"]


# ------------------------------------------------------------------------------------------------ ShapesWorld
@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmkit.shapesworld.world import generate_shapesworld

    out = tmp_path_factory.mktemp("shapes")
    return generate_shapesworld(out, 0, seed=3, splits={"test": 6})["test"]


def test_score_shapesworld_perfect_and_partial(shapes_split: Path) -> None:
    records = json.loads(shapes_split.read_text())
    counts = Counter(r["task"] for r in records)
    perfect = score_shapesworld(records, {r["id"]: r["answer"] for r in records})
    for name in (
        "attribute_qa_acc",
        "counting_acc",
        "spatial_acc",
        "grounding_acc50",
        "region_acc",
        "caption_exact",
        "pope_accuracy",
        "pope_f1",
    ):
        assert perfect[name] == 1.0, name
    assert perfect["pope_yes_ratio"] == pytest.approx(
        sum(r["answer"] == "yes" for r in records if r["task"] == "pope") / counts["pope"]
    )
    assert all(perfect[f"n_{task}"] == n for task, n in counts.items())

    words = {1: "one", 2: "two", 3: "three"}
    preds = {}
    for r in records:
        answer = r["answer"]
        if r["task"] == "caption":
            answer = "  " + answer.upper().replace(",", " ,")  # case / spacing / punctuation do not matter
        elif r["task"] == "counting":
            answer = f"There are {words.get(int(answer), answer)}."
        elif r["task"] == "pope":
            answer = "yes"
        preds[r["id"]] = answer
    first_grounding = next(r["id"] for r in records if r["task"] == "grounding")
    preds[first_grounding] = {"answer": "whatever", "box": None}  # a run that found no box
    out = score_shapesworld(records, preds)
    assert out["caption_exact"] == 1.0 and out["counting_acc"] == 1.0
    assert out["grounding_acc50"] == pytest.approx((counts["grounding"] - 1) / counts["grounding"])
    assert out["pope_yes_ratio"] == 1.0 and out["pope_recall"] == 1.0
    assert out["pope_accuracy"] == pytest.approx(perfect["pope_yes_ratio"])


def test_registry_names_and_unknown_benchmark(tmp_path: Path) -> None:
    for name in (
        "pope",
        "mme",
        "vqav2",
        "multiple-choice",
        "grounding",
        "captioning",
        "judge",
        "shapesworld",
    ):
        assert name in BENCHMARKS
    with pytest.raises(KeyError, match="known benchmarks"):
        build_benchmark("nope", tmp_path)


def test_load_predictions_skips_torn_line_and_keeps_latest(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"question_id": 1, "answer": "a"}\n{"question_id": 1, "answer": "b"}\n{"question_id": 2, "ans'
    )
    assert load_predictions(path) == {"1": {"question_id": 1, "answer": "b"}}
