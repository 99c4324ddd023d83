"""The lean LLM forward of the server's engine (infer/lean.py): the same logits, bit for bit, as transformers'
forward on Llama-family LLMs (fp32 and bf16, plain, prepacked and fused linears, GQA or not, every bridge and xattn);
anything else falls back to the model's own forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit.config import BridgeConfig, LLMConfig
from vlmkit.infer import lean as lean_mod
from vlmkit.infer.engine import Engine, RowSink
from vlmkit.infer.generate import ChatRequest, Predictor
from vlmkit.infer.lean import LeanLLM, unsupported
from vlmkit.infer.prepack import available, fuse_projections, prepack_linears
from vlmkit.models.fusion.xattn import XAttnFusionConfig
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel

from conftest import lively_model, random_image, tiny_model_config, user_turn

GREEDY = GenerationConfig(max_new_tokens=12, eos_token_ids=[-1])
ARCHITECTURES = {
    "mlp": {},
    "qformer": {"bridge": BridgeConfig.make("qformer", num_queries=4)},
    "xattn": {"fusion": XAttnFusionConfig(mode="xattn", every=1, heads=2)},
}


class _Rec:
    def __init__(self) -> None:
        self.result, self.errors = None, []
        self.sink = RowSink(on_text=lambda delta: None, on_done=self._done, on_error=self.errors.append)

    def _done(self, result) -> None:
        self.result = result


def _add(engine: Engine, request: ChatRequest) -> _Rec:
    rec = _Rec()
    engine.add(engine.prepare(request), rec.sink)
    return rec


def _run(engine: Engine) -> None:
    for _ in range(500):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def _requests() -> list[ChatRequest]:
    return [
        ChatRequest(user_turn("what is in the picture?", 1), [random_image(1)], GREEDY),
        ChatRequest(
            user_turn("hello there, how are you today?"), [], dataclasses.replace(GREEDY, max_new_tokens=5)
        ),
        ChatRequest(user_turn("compare the two", 2), [random_image(2, (60, 30)), random_image(3)], GREEDY),
    ]


def _serve(
    predictor: Predictor, lean: bool, requests: list[ChatRequest], kernel: bool = False
) -> tuple[Engine, list, list]:
    """Run `requests` through an engine (rows joining a running batch, prompts in chunks) -> the engine, each
    row's tokens and the logits of every LLM call. `kernel`: decode steps by infer/kernels.py (not
    bit-identical; off for the comparisons with transformers' forward)."""
    engine = Engine(predictor, max_rows=4, prefill_chunk=6, lean=lean, cpu_kernels=kernel)
    calls: list[torch.Tensor] = []
    step = engine.batch.step_fn

    def recorded(*args):
        out = step(*args)
        calls.append(out.logits[:, -1].clone())
        return out

    engine.batch.step_fn = recorded
    first = _add(engine, requests[0])
    for _ in range(3):
        engine.step()
    recs = [first] + [_add(engine, r) for r in requests[1:]]
    _run(engine)
    assert all(not rec.errors for rec in recs)
    return engine, [rec.result.token_ids for rec in recs], calls


def _assert_same(predictor: Predictor, requests: list[ChatRequest] | None = None) -> Engine:
    requests = requests or _requests()
    hf_engine, hf_tokens, hf_calls = _serve(predictor, False, requests)
    engine, tokens, calls = _serve(predictor, True, requests)
    assert hf_engine.lean is None and engine.lean is not None
    assert tokens == hf_tokens
    assert len({tuple(t) for t in tokens}) == len(tokens)  # distinct answers: rows mixed up would show
    assert len(calls) == len(hf_calls) > 10
    for a, b in zip(calls, hf_calls):  # prompt chunks and decode steps alike
        assert torch.equal(a, b)
    return engine


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_lean_forward_gives_transformers_logits_bit_for_bit(arch):
    model = lively_model(**ARCHITECTURES[arch])
    assert unsupported(model) is None
    engine = _assert_same(Predictor(model))
    if arch == "xattn":  # the cross-attention blocks ran inside the lean forward
        assert any(layer.xattn is not None for layer in engine.lean.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])  # grouped-query attention, and one KV head per query head
def test_lean_forward_matches_with_packed_and_fused_linears(dtype, heads):
    """The serving path: weights in fp32 or bf16, linears prepacked for oneDNN and q/k/v, gate/up fused."""
    model = lively_model({"num_attention_heads": heads[0], "num_key_value_heads": heads[1]}).to(dtype)
    if available():
        assert fuse_projections(model.llm) == 2 * len(model.llm.layers)
        assert prepack_linears(model) > 0
    _assert_same(Predictor(model))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_lean_forward_covers_the_other_llama_families(family):
    """Qwen2 (q/k/v with biases) and Mistral decoders, plain and prepacked."""
    model = lively_model({"model_type": family, "attention_bias": True})
    assert type(model.llm.decoder).__name__ == f"{family.capitalize()}Model"
    if family == "qwen2":
        assert model.llm.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():
            for layer in model.llm.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.3)
    _assert_same(Predictor(model))
    if available():
        prepack_linears(model)
        _assert_same(Predictor(model))


def test_other_llms_and_calls_fall_back_to_the_models_forward(monkeypatch):
    # an architecture with another layer structure (Qwen3: q/k norms) is not taken
    torch.manual_seed(0)
    qwen3 = VisionLanguageModel.from_config(
        tiny_model_config(llm=LLMConfig.make("tiny", hf_config={"model_type": "qwen3", "head_dim": 16}))
    ).eval()
    assert "Qwen3Model is not a known Llama-family decoder" in unsupported(qwen3)
    assert LeanLLM.build(qwen3) is None
    predictor = Predictor(qwen3)
    request = _requests()[1]
    engine = Engine(predictor, max_rows=2, lean=True)
    assert engine.lean is None and engine.batch.step_fn == qwen3._step
    rec = _add(engine, request)
    _run(engine)
    assert rec.result.token_ids == predictor.generate([request])[0].token_ids

    # another device than the CPU (where bit-identity is tested) is not taken
    assert "on meta" in unsupported(lively_model().to("meta"))

    # eager attention (its numerics differ from SDPA's) is not taken
    model = lively_model()
    model.llm.set_attention("eager")
    assert "attention 'eager'" in unsupported(model)
    model.llm.set_attention("sdpa")
    assert unsupported(model) is None

    # a call the lean forward cannot take (autocast on, a keyword it does not know) goes to the fallback
    seen = []
    lean = LeanLLM.build(model, fallback=lambda *args: seen.append(args[-1]) or "fallback")
    embeds = torch.zeros(1, 1, model.llm.hidden_size)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert lean(embeds, mask, torch.zeros(1, 1, dtype=torch.long), None, {}) == "fallback"  # not a SlotCache
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine = Engine(Predictor(model), max_rows=2)
        engine.lean.fallback = lambda *args: seen.append("autocast") or model._step(*args)
        engine.batch = engine._new_batch()
        rec = _add(engine, _requests()[1])
        _run(engine)
    assert "autocast" in seen and rec.result.completion_tokens == 5
    monkeypatch.setattr(lean_mod, "FAMILIES", {})
    assert "not a known Llama-family decoder" in unsupported(model)


# ------------------------------------------------------------------------------ prompts prefilled together


def _calls(engine: Engine) -> list[tuple[int, int]]:
    """Record the (rows, tokens) shape of every prompt call of `engine`'s LLM."""
    shapes: list[tuple[int, int]] = []
    step = engine.batch.step_fn

    def recorded(embeds, *rest):
        if embeds.shape[1] > 1:
            shapes.append(tuple(embeds.shape[:2]))
        return step(embeds, *rest)

    engine.batch.step_fn = recorded
    return shapes


def test_rows_arriving_together_are_prefilled_in_one_call_with_their_solo_answers():
    model = lively_model()
    predictor = Predictor(model)
    requests = [
        ChatRequest(user_turn("what is in the picture?", 1), [random_image(1)], GREEDY),
        ChatRequest(
            user_turn("a row that ends at its first token"), [], dataclasses.replace(GREEDY, max_new_tokens=1)
        ),
        ChatRequest(user_turn("hello there, how are you today? tell me more"), [], GREEDY),
        ChatRequest(user_turn("compare the two", 2), [random_image(2, (60, 30)), random_image(3)], GREEDY),
    ]
    solo = [predictor.generate([r])[0].token_ids for r in requests]
    lengths = [Engine(predictor).prepare(r).prompt_tokens for r in requests]
    assert len(set(lengths)) == len(lengths)  # right padding is exercised
    engine = Engine(predictor, max_rows=4, prefill_chunk=8, prefill_burst=sum(lengths[:3]))
    shapes = _calls(engine)
    recs = [_add(engine, r) for r in requests]
    engine.step()
    # nothing decoding: the first three prompts (within prefill_burst tokens) in one call, then the last alone
    assert shapes == [(3, max(lengths[:3])), (1, lengths[3])]
    assert recs[1].result is not None and len(recs[1].result.token_ids) == 1  # done at once: its slot freed
    assert engine.batch.size == 3
    _run(engine)
    assert [rec.result.token_ids for rec in recs] == solo

    # rows decoding: a group stays within one chunk's tokens, so the streams wait no longer than before
    engine = Engine(predictor, max_rows=4, prefill_chunk=lengths[0] + lengths[2])
    shapes = _calls(engine)
    first = _add(engine, requests[3])
    engine.step()
    others = [_add(engine, requests[i]) for i in (0, 2)]
    engine.step()
    assert shapes == [(1, lengths[3]), (2, max(lengths[0], lengths[2]))]
    _run(engine)
    assert [rec.result.token_ids for rec in [first, *others]] == [solo[3], solo[0], solo[2]]

    # off: one row at a time
    engine = Engine(predictor, max_rows=4, prefill_together=False)
    shapes = _calls(engine)
    recs = [_add(engine, r) for r in requests]
    _run(engine)
    assert [s[0] for s in shapes] == [1, 1, 1, 1] and [rec.result.token_ids for rec in recs] == solo


def test_a_failed_prefill_together_goes_again_row_by_row():
    model = lively_model()
    predictor = Predictor(model)
    requests = [ChatRequest(user_turn(f"question number {i}"), [], GREEDY) for i in range(3)]
    solo = [predictor.generate([r])[0].token_ids for r in requests]
    engine = Engine(predictor, max_rows=4, prefill_together=True)
    failures = []

    def broken(inputs, prefixes=None, reuse=0):
        failures.append(len(inputs))
        raise RuntimeError("out of memory")

    engine.batch.prefill_many = broken
    shapes = _calls(engine)
    recs = [_add(engine, r) for r in requests]
    _run(engine)
    assert failures == [3] and [s[0] for s in shapes] == [1, 1, 1]
    assert [rec.result.token_ids for rec in recs] == solo and not any(rec.errors for rec in recs)


def test_xattn_rows_with_images_are_prefilled_alone():
    model = lively_model(**ARCHITECTURES["xattn"])
    predictor = Predictor(model)
    requests = [
        ChatRequest(user_turn("hello there"), [], GREEDY),
        ChatRequest(user_turn("and you?"), [], GREEDY),
        ChatRequest(user_turn("what is in the picture?", 1), [random_image(1)], GREEDY),
        ChatRequest(user_turn("one more"), [], GREEDY),
        ChatRequest(user_turn("and the last one"), [], GREEDY),
    ]
    solo = [predictor.generate([r])[0].token_ids for r in requests]
    engine = Engine(predictor, max_rows=5, prefill_together=True)
    shapes = _calls(engine)
    recs = [_add(engine, r) for r in requests]
    _run(engine)
    # the image row carries cross-attention inputs: alone, in order; the text rows after it join its batch together
    assert [s[0] for s in shapes] == [2, 1, 2]
    assert [rec.result.token_ids for rec in recs] == solo
