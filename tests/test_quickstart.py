"""The quickstart's whole path (`vlmkit quickstart --tiny`): data, tower pretraining, both stages, evaluation."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.quickstart import TEXT_QUESTIONS

REQUIRED = (
    "attribute_qa_acc",
    "counting_acc",
    "pope_f1",
    "grounding_acc50",
    "caption_exact",
    "text_answers_changed",
    "wall_s",
    "peak_rss_gib",
)


def test_tiny_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--tiny", "--out", str(out)]) == 0
    results = json.loads((out / "quickstart-results.json").read_text())
    for key in REQUIRED:
        assert key in results, key
    for key in ("attribute_qa_acc", "counting_acc", "pope_f1", "grounding_acc50", "caption_exact"):
        assert 0.0 <= results[key] <= 1.0
    assert results["counts"]["n_grounding"] > 0 and results["counts"]["n_pope"] > 0
    assert 0 <= results["text_answers_changed"] <= len(TEXT_QUESTIONS)
    assert len(results["text_answers"]["before"]) == len(TEXT_QUESTIONS)
    assert results["wall_s"] > 0 and 0 < results["peak_rss_gib"] < 8
    assert (out / "quickstart-results.png").stat().st_size > 1000
    # counting and POPE are trained on replies that list the objects first (data.synthetic.describe_first)
    train = json.loads((out / "data" / "train.json").read_text())
    replies = {r["task"]: r["conversations"][1]["value"] for r in train}
    assert replies["pope"].startswith("I see ") and replies["counting"].startswith("I see: first, ")
    assert not replies["caption"].startswith("I see")
    # the tower was pretrained first, and stage 1 (align) kept it frozen at those weights
    pretrained = load_file(str(out / "vision-pretrain" / "vision.safetensors"))
    align = VisionLanguageModel.from_pretrained(out / "stages" / "0-align" / "model")
    assert torch.equal(align.vision.patch_embed.weight, pretrained["patch_embed.weight"])
    assert (out / "feature_cache").is_dir()  # stage 1 used cached tower features
    # the final model is a normal model directory: loadable by chat / serve / eval
    model = VisionLanguageModel.from_pretrained(out / "model")
    assert model.cfg.processor.template == "chatml" and model.cfg.processor.grounding_format == "qwen"
    printed = capsys.readouterr().out
    assert f"vlmkit chat {out / 'model'}" in printed.replace("\n", "") and "vlmkit serve" in printed
