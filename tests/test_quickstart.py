"""The quickstart's whole path (`vlmkit quickstart --tiny`): data, tower pretraining, training, evaluation, text check."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.config import RecipeConfig, load_config
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.quickstart import TEXT_QUESTIONS
from vlmkit.train.metrics import read_metrics
from vlmkit.train.trainer import Trainer

REQUIRED = (
    "attribute_qa_acc",
    "counting_acc",
    "pope_f1",
    "grounding_acc50",
    "caption_exact",
    "text_correct_before",
    "text_correct_after",
    "text_answers_changed",
    "wall_s",
    "peak_rss_gib",
)


def test_tiny_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--tiny", "--out", str(out), "--seed", "3"]) == 0
    results = json.loads((out / "quickstart-results.json").read_text())
    for key in REQUIRED:
        assert key in results, key
    for key in ("attribute_qa_acc", "counting_acc", "pope_f1", "grounding_acc50", "caption_exact"):
        assert 0.0 <= results[key] <= 1.0
    assert results["counts"]["n_grounding"] > 0 and results["counts"]["n_pope"] > 0
    assert (
        results["recipe"]["seed"] == 3
        and json.loads((out / "data" / "shapesworld_info.json").read_text())["seed"] == 3
    )
    # text questions: scored before and after; the image-gated LoRA leaves text-only answers untouched
    answers = results["text_answers"]
    assert len(answers["before"]) == len(answers["correct_after"]) == len(TEXT_QUESTIONS) >= 10
    assert answers["after"] == answers["before"] and results["text_answers_changed"] == 0
    assert results["text_correct_after"] == results["text_correct_before"] == sum(answers["correct_before"])
    assert results["wall_s"] > 0 and 0 < results["peak_rss_gib"] < 8
    assert (out / "quickstart-results.png").stat().st_size > 1000
    # learning curves from the generation hook, and the visual-token statistics, in metrics.jsonl
    rows = read_metrics(out / "metrics.jsonl")
    assert any("gen_attribute_qa_acc" in r for r in rows) and any("val_visual_cos" in r for r in rows)
    assert (out / "learning-curves.png").stat().st_size > 1000
    # direct answers (no object list first), boxes in pixels
    train = json.loads((out / "data" / "train.json").read_text())
    replies = {r["task"]: r["conversations"][1]["value"] for r in train}
    assert replies["pope"] in ("yes", "no") and replies["counting"].isdigit()
    assert replies["grounding"].startswith("the ") and replies["grounding"].endswith("]")
    # the tower was pretrained first; the bridge took the detection head that pretraining saved
    pretrained = load_file(str(out / "vision-pretrain" / "vision.safetensors"))
    head = load_file(str(out / "vision-pretrain" / "detection_head.safetensors"))
    model = VisionLanguageModel.from_pretrained(out / "model")
    assert torch.equal(model.vision.patch_embed.weight, pretrained["patch_embed.weight"])
    assert torch.equal(model.bridge.head.dense[1].weight, head["dense.1.weight"])  # frozen: unchanged
    assert (out / "feature_cache").is_dir()  # the frozen tower's features were cached
    # the final model is a normal model directory (chat / serve / eval) with its gated adapter
    assert model.cfg.processor.template == "chatml" and model.cfg.processor.grounding_format == "pixel"
    assert model.cfg.lora is not None and model.cfg.lora.gate == "image" and model.lora_gate is not None
    printed = capsys.readouterr().out
    assert f"vlmkit chat {out / 'model'}" in printed.replace("\n", "") and "vlmkit serve" in printed


@pytest.mark.slow
def test_real_recipe_first_steps_lower_the_loss(tmp_path):
    """configs/quickstart.yaml as it is (SmolLM2, object slots, image-gated LoRA) on a small data set and a short
    tower pretraining: the first optimizer steps lower the training loss."""
    recipe = load_config(
        RecipeConfig,
        "quickstart",
        [
            "data.synthetic.n_train=128",
            "data.synthetic.n_val=8",
            "data.synthetic.n_test=8",
            "pretrain_vision.steps=60",
            "stages.0.max_steps=12",
            "stages.0.warmup_ratio=0",
            "train.eval_every=0",
            "train.eval_generation=0",
            "train.save_every=0",
            "train.plot=false",
        ],
    )
    Trainer(recipe, tmp_path / "run").run()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    stats = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_visual_cos" in r]
    # word tokens: at the word-embedding scale, and the LLM's layers transform them as they do text
    assert 0.3 < stats[-1]["val_visual_rms_ratio"] < 3 and stats[-1]["val_visual_cos"][-1] < 0.5
