"""The Processor: one path from conversations and images to model inputs for training, chat, eval and export."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from vlmkit.config import ConfigError, DataConfig, ProcessorConfig, RecipeConfig, from_dict, to_dict
from vlmkit.data.dataset import VLMDataset
from vlmkit.data.formats import Message, Sample
from vlmkit.data.processor import PROCESSOR_NAME, Processor, VisionGeometry
from vlmkit.infer.generate import ChatRequest, Predictor
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image, tiny_model_config


@pytest.fixture(scope="module")
def pad_model():
    """A tiny model whose processor letterboxes (`resize: pad`) with a non-default system prompt."""
    torch.manual_seed(0)
    cfg = tiny_model_config()
    cfg.processor = ProcessorConfig(resize="pad", system_prompt="Be brief.", template="chatml")
    return VisionLanguageModel.from_config(cfg).eval()


def _write_record(tmp_path, image) -> None:
    image.save(tmp_path / "wide.png")
    record = {
        "id": "r0",
        "image": "wide.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A pattern."},
        ],
    }
    (tmp_path / "data.json").write_text(json.dumps([record]))


def test_training_chat_and_prompt_paths_see_the_same_pixels(pad_model, tmp_path):
    """`resize: pad` letterboxes in every path: the dataset, the Predictor and `model.prepare_prompts` (which
    used to stretch the image with the tower's own transform while the Predictor padded it)."""
    wide = random_image(7, (64, 16))
    _write_record(tmp_path, wide)
    dataset = VLMDataset.from_config(DataConfig(), tmp_path / "data.json", pad_model.processor)
    trained = dataset[0]["pixel_values"]  # [1, 3, 32, 32]
    predictor = Predictor(pad_model)
    batch, _ = predictor.prepare([ChatRequest([{"role": "user", "content": "<image>\nWhat is it?"}], [wide])])
    prompted = pad_model.prepare_prompts(["<image>\nWhat is it?"], [[wide]])["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], trained, rtol=0, atol=0)
    torch.testing.assert_close(prompted, trained, rtol=0, atol=0)
    assert trained[0, :, :4].abs().max() < 0.01  # the letterbox bar (mean colour -> 0 after normalising)
    # the chat prompt equals the training prompt up to the answer
    train_ids = dataset[0]["input_ids"].tolist()
    chat_ids = batch["input_ids"][0].tolist()
    assert train_ids[: len(chat_ids)] == chat_ids
    assert "Be brief." in pad_model.tokenizer.decode(chat_ids)


def test_saved_processor_loads_without_the_model_and_pickles(pad_model, tmp_path):
    pad_model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / PROCESSOR_NAME).read_text())
    assert (
        saved["processor"]["resize"] == "pad"
        and saved["geometry"]["tokens_per_tile"] == pad_model.tokens_per_image()
    )
    loaded = Processor.from_pretrained(tmp_path / "m")  # tokenizer + settings only: no weights read
    again = pickle.loads(pickle.dumps(loaded))  # what a data-loader worker receives
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    image = random_image(3, (50, 20))
    want = pad_model.processor.encode_chat(messages, [image])
    for proc in (loaded, again):
        got = proc.encode_chat(messages, [image])
        assert got.prompt == want.prompt and torch.equal(got.input_ids, want.input_ids)
        torch.testing.assert_close(got.pixel_values, want.pixel_values, rtol=0, atol=0)


def test_dataset_needs_no_model(pad_model, tmp_path):
    _write_record(tmp_path, random_image(1, (30, 40)))
    pad_model.save_pretrained(tmp_path / "m")
    standalone = VLMDataset.from_config(
        DataConfig(), tmp_path / "data.json", Processor.from_pretrained(tmp_path / "m")
    )
    from_model = VLMDataset.from_config(DataConfig(), tmp_path / "data.json", pad_model.processor)
    a, b = standalone[0], from_model[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_model_saved_before_the_processor_file_still_loads(pad_model, tmp_path):
    """Directories of the previous version: no processor_config.json, a config.json without the new keys."""
    out = pad_model.save_pretrained(tmp_path / "old")
    (out / PROCESSOR_NAME).unlink()
    meta = json.loads((out / "config.json").read_text())
    meta["vlmkit_version"] = "0.0.9"
    for key in ("max_image_pixels", "max_image_bytes"):
        del meta["model"]["processor"][key]
    (out / "config.json").write_text(json.dumps(meta))
    model = VisionLanguageModel.from_pretrained(out)
    assert model.processor.cfg.resize == "pad" and model.processor.cfg.system_prompt == "Be brief."
    with pytest.raises(FileNotFoundError, match="older vlmkit"):
        Processor.from_pretrained(out)


def test_encoded_training_sample_has_exact_placeholders(pad_model):
    proc = pad_model.processor
    sample = Sample(
        "s",
        [
            Message("user", [{"type": "image"}, {"type": "text", "text": "Hi"}]),
            Message("assistant", [{"type": "text", "text": "Yo"}]),
        ],
        ["x.png"],
    )
    enc = proc.encode_training(sample, [1])
    assert (
        enc.input_ids.count(proc.image_token_id) == proc.tokens_per_image(1) == pad_model.tokens_per_image()
    )


def test_legacy_data_keys_move_to_the_processor(caplog):
    raw = {"data": {"template": "vicuna_v1", "resize": "pad", "max_length": 64}}
    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        recipe = from_dict(RecipeConfig, raw)
    assert recipe.model.processor.template == "vicuna_v1" and recipe.model.processor.resize == "pad"
    assert recipe.data.max_length == 64
    assert any("moved to model.processor" in r.getMessage() for r in caplog.records)
    assert "template" not in to_dict(recipe.data)
    with pytest.raises(ConfigError, match="disagree"):
        from_dict(RecipeConfig, {"data": {"resize": "pad"}, "model": {"processor": {"resize": "crop"}}})


def test_unknown_template_or_resize_fails_when_the_processor_is_built(pad_model):
    geometry = VisionGeometry(32, tokens_per_tile=4)
    with pytest.raises(ValueError, match="unknown chat template"):
        Processor(ProcessorConfig(template="nope"), pad_model.tokenizer, geometry)
    with pytest.raises(ValueError, match="unknown resize mode"):
        Processor(ProcessorConfig(resize="squash"), pad_model.tokenizer, geometry)
