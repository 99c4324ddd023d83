"""End-to-end eval with the tiny random model: CLI, ShapesWorld suite, resume, provenance, model-scored MC."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import vlmkit
from vlmkit.cli import main
from vlmkit.eval.benchmarks import build_benchmark
from vlmkit.eval.choice import OptionTrie, constrained_choice, option_logprobs
from vlmkit.eval.runner import config_sha256, run_eval
from vlmkit.infer.generate import ChatRequest, Predictor
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.scoring import TASK_METRICS, evaluate_shapesworld

from conftest import random_image


@pytest.fixture(scope="module")
def model_dir(tiny_vlm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pope")
    rows = []
    for i, (split, label) in enumerate(
        [
            ("random", "yes"),
            ("random", "no"),
            ("popular", "yes"),
            ("popular", "no"),
            ("adversarial", "yes"),
            ("adversarial", "no"),
        ]
    ):
        random_image(i).save(root / f"img{i}.png")
        obj = ("cat", "dog", "red circle", "car", "tree", "person")[i]
        rows.append(
            {
                "question_id": 100 + i,
                "image": f"img{i}.png",
                "text": f"Is there a {obj} in the image?",
                "label": label,
                "category": split,
            }
        )
    path = root / "pope.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_eval_pope_files_and_provenance(
    model_dir: Path, pope_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    argv = [
        "eval",
        str(model_dir),
        "--benchmark",
        "pope",
        "--data",
        str(pope_file),
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "4",
        "--no-progress",
        "--json",
        "--seed",
        "7",
    ]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio", "random_accuracy", "adversarial_f1"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["n"] == 6

    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["question_id"] for p in lines) == list(range(100, 106))
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == metrics and results["num_items"] == 6 and results["num_generated"] == 6
    prov = results["provenance"]
    assert prov["model"]["path"] == str(model_dir)
    assert prov["model"]["config_sha256"] == config_sha256(VisionLanguageModel.from_pretrained(model_dir))
    assert prov["benchmark"]["files"] == {str(pope_file): hashlib.sha256(pope_file.read_bytes()).hexdigest()}
    assert prov["versions"]["vlmkit"] == vlmkit.__version__
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["versions"]["transformers"] == transformers.__version__
    assert prov["seed"] == 7 and prov["decoding"]["seed"] == 7
    assert prov["decoding"]["max_new_tokens"] == 3 and prov["decoding"]["batch_size"] == 4
    assert prov["prompt"]["prompt_format"].endswith("Answer the question using a single word or phrase.")
    assert (
        "Is there a cat in the image?" in prov["prompt"]["example"]
        and "<image>×16" in prov["prompt"]["example"]
    )
    assert prov["time"].endswith("Z") and prov["finished"] >= prov["time"]

    # re-scoring the saved predictions without a model gives the same numbers
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "score",
                "--benchmark",
                "pope",
                "--data",
                str(pope_file),
                "--predictions",
                str(out / "predictions.jsonl"),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == metrics


def test_config_hash_tracks_the_architecture(tiny_vlm) -> None:
    other = dataclasses.replace(tiny_vlm.cfg, bridge=dataclasses.replace(tiny_vlm.cfg.bridge, kind="linear"))
    assert config_sha256(tiny_vlm) == config_sha256(SimpleNamespace(cfg=tiny_vlm.cfg))
    assert config_sha256(tiny_vlm) != config_sha256(SimpleNamespace(cfg=other))


def test_resume_regenerates_only_missing_items(tiny_vlm, pope_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    gen = GenerationConfig(max_new_tokens=3)
    first = run_eval(
        tiny_vlm, build_benchmark("pope", pope_file), out, batch_size=1, generation=gen, progress=False
    )
    original = (out / "predictions.jsonl").read_text().splitlines()
    kept = [line for k, line in enumerate(original) if k not in (1, 4)]
    (out / "predictions.jsonl").write_text("\n".join(kept) + "\n")

    bench = build_benchmark("pope", pope_file)
    asked: list[str] = []
    predict = bench.predict
    bench.predict = lambda p, items, c: asked.extend(i.key for i in items) or predict(p, items, c)
    second = run_eval(tiny_vlm, bench, out, batch_size=1, generation=gen, progress=False)
    assert sorted(asked) == sorted(str(json.loads(original[k])["question_id"]) for k in (1, 4))
    assert second["num_generated"] == 2 and second["metrics"] == first["metrics"]
    final = {json.loads(x)["question_id"]: x for x in (out / "predictions.jsonl").read_text().splitlines()}
    assert sorted(final.values()) == sorted(original)  # the regenerated lines are the same predictions

    with pytest.raises(RuntimeError, match="another model or benchmark"):
        other = pope_file.parent / "other.jsonl"
        other.write_text(pope_file.read_text().replace("cat", "bird"))
        run_eval(tiny_vlm, build_benchmark("pope", other), out, generation=gen, progress=False)


def test_shapesworld_suite_end_to_end(tiny_vlm, tmp_path: Path) -> None:
    from vlmkit.shapesworld.world import generate_shapesworld

    split = generate_shapesworld(tmp_path / "sw", 0, seed=1, splits={"test": 4})["test"]
    records = json.loads(split.read_text())
    counts = Counter(r["task"] for r in records)
    metrics = evaluate_shapesworld(tiny_vlm, split, batch_size=16, max_new_tokens=4, out_dir=tmp_path / "ev")
    assert counts["pope"] == 4 and counts["grounding"] == 4
    for task, name in TASK_METRICS.items():  # every task present reports its metric
        assert (name in metrics) == (task in counts), name
        assert 0.0 <= metrics.get(name, 0.0) <= 1.0
    for name in ("pope_accuracy", "pope_f1", "pope_yes_ratio"):
        assert 0.0 <= metrics[name] <= 1.0
    assert all(metrics[f"n_{task}"] == n for task, n in counts.items())
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(records)
    assert all("box" in p for p in preds if p["task"] == "grounding")
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["metrics"] == metrics and results["benchmark"] == "shapesworld"
    # a Predictor works too, and without an output dir nothing is written
    again = evaluate_shapesworld(Predictor(tiny_vlm), split, batch_size=16, max_new_tokens=4)
    assert again == metrics


# ----------------------------------------------------------------------------------- model-scored choices
def test_option_trie() -> None:
    trie = OptionTrie([[1, 2, 3], [1, 2], [4]])
    assert trie.allowed([]) == [1, 4] and trie.allowed([1]) == [2] and trie.allowed([1, 2]) == [3]
    assert trie.options([1, 2]) == [0, 1] and trie.options([4]) == [2] and trie.options([9]) == []


def _prompt(tiny_vlm, text: str):
    predictor = Predictor(tiny_vlm)
    batch, _ = predictor.prepare(
        [ChatRequest([{"role": "user", "content": f"<image>\n{text}"}], [random_image(5)])]
    )
    return batch["input_ids"][0].tolist(), batch["pixel_values"]


def _logits(tiny_vlm, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (
            tiny_vlm(input_ids=torch.tensor([ids]), pixel_values=pixels, image_counts=[1]).logits[0].float()
        )


def test_option_logprobs_match_unbatched_forward(tiny_vlm) -> None:
    tok = tiny_vlm.tokenizer
    prompt, pixels = _prompt(tiny_vlm, "What shape is it?")
    options = [tok(t, add_special_tokens=False)["input_ids"] for t in ("circle", "red square", "a blue star")]
    got = option_logprobs(tiny_vlm, prompt, pixels, options)
    for (total, avg), option in zip(got, options):
        logp = _logits(tiny_vlm, prompt + option, pixels).log_softmax(-1)
        expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option))
        assert total == pytest.approx(expected, abs=1e-4) and avg == pytest.approx(
            expected / len(option), abs=1e-4
        )


def test_constrained_choice_is_greedy_within_the_options(tiny_vlm) -> None:
    tok = tiny_vlm.tokenizer
    eos = tiny_vlm.llm.eos_token_ids[0]
    prompt, pixels = _prompt(tiny_vlm, "Which object?")
    texts = ("red circle", "red square", "blue circle", "red")  # shared prefixes; "red" is a prefix of two
    options = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # brute-force reference: at each step the argmax over tokens that continue some (option + EOS)
    full = [o + [eos] for o in options]
    generated: list[int] = []
    while len({tuple(f) for f in full if f[: len(generated)] == generated}) > 1:
        allowed = sorted(
            {f[len(generated)] for f in full if f[: len(generated)] == generated and len(f) > len(generated)}
        )
        logits = _logits(tiny_vlm, prompt + generated, pixels)[-1]
        generated.append(max(allowed, key=lambda t: float(logits[t])))
    expected = next(k for k, f in enumerate(full) if f[: len(generated)] == generated)
    assert constrained_choice(tiny_vlm, prompt, pixels, options) == expected


@pytest.mark.parametrize("mode", ["likelihood", "constrained"])
def test_multiple_choice_modes_end_to_end(tiny_vlm, tmp_path: Path, mode: str) -> None:
    random_image(9).save(tmp_path / "x.png")
    rows = [
        {
            "question_id": i,
            "image": "x.png",
            "question": f"Which shape {i}?",
            "options": ["circle", "square", "star"],
            "answer": "ABC"[i],
        }
        for i in range(3)
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = build_benchmark("multiple-choice", tmp_path / "mc.jsonl", mode=mode, target="text")
    results = run_eval(tiny_vlm, bench, tmp_path / "out", batch_size=2, progress=False)
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    for p in preds:
        assert (
            p["choice"] in "ABC" and p["answer"] == {"A": "circle", "B": "square", "C": "star"}[p["choice"]]
        )
        if mode == "likelihood":
            sums = {k: v["sum"] for k, v in p["option_logprobs"].items()}
            assert p["choice"] == max(sums, key=sums.get)
    right = sum(p["choice"] == "ABC"[p["question_id"]] for p in preds)
    assert results["metrics"]["accuracy"] == pytest.approx(right / 3)
    assert results["provenance"]["benchmark"]["mode"] == mode
