"""bf16 inference (`vlmkit serve --dtype bf16`): on a trained model (the tiny quickstart) bf16 and fp32 give the same
greedy answers for most prompts, and the logits stay within the tolerance stated in docs/serving.md."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmkit.infer.engine import Engine, RowSink
from vlmkit.infer.generate import ChatRequest, serving_dtype
from vlmkit.infer.server import build_predictor
from vlmkit.models.generation import GenerationConfig
from vlmkit.shapesworld.quickstart import run_quickstart

PROMPTS = 48
AGREEMENT = 0.9  # greedy answers identical in fp32 and bf16, at least this share of prompts
LOGIT_TOLERANCE = 0.1  # max |logit_fp32 - logit_bf16| over the prompts, in units of the fp32 logits' std


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    run_quickstart(out, tiny=True)
    return out


def _requests(run_dir) -> list[ChatRequest]:
    records = json.loads((run_dir / "data" / "test.json").read_text())[:PROMPTS]
    requests = []
    for rec in records:
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(run_dir / "data" / rec["image"]).convert("RGB")
        content = [{"type": "image"}, {"type": "text", "text": question}]
        requests.append(ChatRequest([{"role": "user", "content": content}], [image]))
    return requests


def _answers(predictor, requests) -> list[list[int]]:
    """Greedy answers through the serving engine (continuous batching, as `vlmkit serve` decodes)."""
    engine = Engine(predictor, max_rows=16)
    results: list = [None] * len(requests)
    for i, request in enumerate(requests):
        sink = RowSink(on_done=lambda result, i=i: results.__setitem__(i, result))
        engine.add(engine.prepare(request, GenerationConfig(max_new_tokens=24)), sink)
    while engine.busy:
        engine.step()
    return [r.token_ids for r in results]


def test_bf16_and_fp32_agree_on_a_trained_model(trained):
    fp32 = build_predictor(trained / "model", dtype="fp32")
    bf16 = build_predictor(trained / "model", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(fp32.model.parameters()).dtype == torch.float32
    requests = _requests(trained)
    same = sum(a == b for a, b in zip(_answers(fp32, requests), _answers(bf16, requests)))
    assert same >= AGREEMENT * len(requests), f"{same}/{len(requests)} answers agree"

    batch, _ = fp32.prepare(requests[:16])
    with torch.no_grad():
        reference = fp32.model(**batch).logits.float()
        half = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
        logits = bf16.model(**half).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (reference - logits).abs()[mask]  # [tokens, V]
    scale = reference[mask].std()
    assert diff.max() <= LOGIT_TOLERANCE * scale, f"max |diff| {diff.max():.4f} vs std {scale:.4f}"
    top1 = (reference.argmax(-1) == logits.argmax(-1))[mask].float().mean()
    assert top1 >= 0.95


def test_auto_dtype_is_bf16_only_where_the_hardware_computes_in_it(monkeypatch):
    import vlmkit.infer.generate as generate

    monkeypatch.setattr(generate, "cpu_bf16_supported", lambda: True)
    assert serving_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(generate, "cpu_bf16_supported", lambda: False)
    assert serving_dtype("auto") == torch.float32
    assert serving_dtype("bf16") == torch.bfloat16 and serving_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        serving_dtype("fp16")
