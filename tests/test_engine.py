"""Continuous batching (infer/engine.py, models/row_batch.py): rows join and leave a running decode batch, each with
its own sampling settings, for prefix fusion with any bridge and for xattn fusion; chunked prefill; cancellation;
the image-feature cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit.config import BridgeConfig
from vlmkit.infer.engine import Engine, RowSink
from vlmkit.infer.generate import ChatRequest, Predictor
from vlmkit.infer.image_cache import ImageFeatureCache
from vlmkit.models.fusion.xattn import XAttnFusionConfig
from vlmkit.models.generation import GenerationConfig

from conftest import lively_model, random_image, user_turn

ARCHITECTURES = {
    "mlp": {},
    "qformer": {"bridge": BridgeConfig.make("qformer", num_queries=4)},
    "perceiver": {"bridge": BridgeConfig.make("perceiver")},
    "cross_attn": {"bridge": BridgeConfig.make("cross_attn")},
    "xattn": {"fusion": XAttnFusionConfig(mode="xattn", every=1, heads=2)},
}


class Recorder:
    """A RowSink that records everything, and the engine step of each event."""

    def __init__(self, engine: Engine, stream: bool = True) -> None:
        self.engine, self.deltas, self.result, self.errors = engine, [], None, []
        self.first_step: int | None = None  # decode steps done when the first token came
        self.done_step: int | None = None
        self.cancel = False
        self.sink = RowSink(
            on_text=self.deltas.append if stream else None,
            on_done=self._done,
            on_error=self.errors.append,
            cancelled=lambda: self.cancel,
            on_first_token=self._first,
        )

    def _done(self, result) -> None:
        self.result = result
        self.done_step = self.engine.stats.decode_steps

    def _first(self) -> None:
        self.first_step = self.engine.stats.decode_steps


def _add(engine: Engine, request: ChatRequest, stream: bool = True) -> Recorder:
    rec = Recorder(engine, stream)
    engine.add(engine.prepare(request), rec.sink)
    return rec


def _run(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_rows_that_join_a_running_batch_get_their_solo_answers(arch):
    model = lively_model(**ARCHITECTURES[arch])
    predictor = Predictor(model)
    greedy = GenerationConfig(eos_token_ids=[-1])
    requests = [
        ChatRequest(
            user_turn("what is in the picture?", 1),
            [random_image(1)],
            dataclasses.replace(greedy, max_new_tokens=24),
        ),
        ChatRequest(
            user_turn("hello there, how are you today?"), [], dataclasses.replace(greedy, max_new_tokens=5)
        ),
        ChatRequest(
            user_turn("compare the two", 2),
            [random_image(2, (60, 30)), random_image(3)],
            dataclasses.replace(greedy, max_new_tokens=7),
        ),
    ]
    solo = [predictor.generate([r])[0] for r in requests]
    assert len({r.text for r in solo}) == 3  # distinct answers: a row copied from another would show

    engine = Engine(predictor, max_rows=4, prefill_chunk=6)  # prompts take several chunks
    first = _add(engine, requests[0])
    for _ in range(4):
        engine.step()
    second = _add(engine, requests[1])
    engine.step()
    third = _add(engine, requests[2])
    _run(engine)
    for rec, expected in zip((first, second, third), solo):
        assert rec.result.token_ids == expected.token_ids
        assert rec.result.text == expected.text == "".join(rec.deltas)
        assert rec.result.finish_reason == "length" and not rec.errors
    # the later rows joined while the earlier ones were decoding, and decode steps were shared
    assert first.first_step < second.first_step < first.done_step
    assert second.first_step <= third.first_step < max(first.done_step, second.done_step)
    assert engine.stats.decoded_rows > engine.stats.decode_steps  # shared decode steps
    assert engine.batch.size == 0 and not engine.busy


def test_each_row_samples_with_its_own_settings_in_one_batch():
    model = lively_model()
    predictor = Predictor(model)
    base = GenerationConfig(max_new_tokens=8, eos_token_ids=[-1])
    configs = [
        base,  # greedy
        dataclasses.replace(base, do_sample=True, temperature=1.3, seed=7),
        dataclasses.replace(
            base, do_sample=True, temperature=0.9, top_p=0.8, top_k=20, seed=11, max_new_tokens=5
        ),
    ]
    requests = [ChatRequest(user_turn(f"tell me story number {i}"), [], c) for i, c in enumerate(configs)]
    solo = [predictor.generate([r])[0] for r in requests]
    engine = Engine(predictor, max_rows=3)
    recs = [_add(engine, r) for r in requests]
    _run(engine)
    assert engine.stats.decoded_rows >= 2 * engine.stats.decode_steps  # decoded together
    for rec, expected in zip(recs, solo):  # the same tokens as alone: per-row settings and random streams
        assert rec.result.token_ids == expected.token_ids
    other_seed = _add(
        engine, dataclasses.replace(requests[1], config=dataclasses.replace(configs[1], seed=8))
    )
    _run(engine)
    assert other_seed.result.token_ids != recs[1].result.token_ids


def test_stop_strings_and_budgets_end_rows_while_others_go_on():
    model = lively_model()
    predictor = Predictor(model)
    free = predictor.chat(user_turn("second one"), max_new_tokens=10, eos_token_ids=[-1]).text
    stop = free[4:6]
    engine = Engine(predictor, max_rows=4)
    short = _add(
        engine, ChatRequest(user_turn("first"), [], GenerationConfig(max_new_tokens=2, eos_token_ids=[-1]))
    )
    stopped = _add(
        engine,
        ChatRequest(
            user_turn("second one"),
            [],
            GenerationConfig(max_new_tokens=10, eos_token_ids=[-1], stop_strings=[stop]),
        ),
    )
    long = _add(
        engine, ChatRequest(user_turn("third"), [], GenerationConfig(max_new_tokens=12, eos_token_ids=[-1]))
    )
    _run(engine)
    assert short.result.completion_tokens == 2 and short.result.finish_reason == "length"
    assert stopped.result.text == free[: free.index(stop)] and stopped.result.finish_reason == "stop"
    assert "".join(stopped.deltas) == stopped.result.text
    assert long.result.completion_tokens == 12


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_are_unaffected():
    model = lively_model(**ARCHITECTURES["xattn"])
    predictor = Predictor(model)
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=[-1])
    keep = ChatRequest(user_turn("keep going", 1), [random_image(4)], config)
    expected = predictor.generate([keep])[0]
    engine = Engine(predictor, max_rows=4)
    gone = _add(engine, ChatRequest(user_turn("I will leave", 1), [random_image(5)], config))
    kept = _add(engine, keep)
    for _ in range(3):
        engine.step()
    assert engine.batch.size == 2
    gone.cancel = True
    engine.step()
    assert engine.batch.size == 1 and gone.result.finish_reason == "cancelled"
    assert len(gone.result.token_ids) < 12
    _run(engine)
    assert kept.result.token_ids == expected.token_ids  # the xattn images of the remaining row followed it


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps():
    model = lively_model()
    predictor = Predictor(model)
    engine = Engine(predictor, max_rows=4, prefill_chunk=8)
    config = GenerationConfig(max_new_tokens=30, eos_token_ids=[-1])
    running = [_add(engine, ChatRequest(user_turn(f"row {i}"), [], config)) for i in range(2)]
    engine.step()  # nothing was decoding: both prompts prefilled at once, no budget
    assert engine.batch.size == 2 and engine.stats.prefill_tokens == sum(
        len(engine.prepare(ChatRequest(user_turn(f"row {i}"), [], config)).ids) for i in range(2)
    )
    long_request = ChatRequest(user_turn("a long question " * 12), [], config)
    prompt = len(engine.prepare(long_request).ids)
    assert prompt > 3 * 8
    late = _add(engine, long_request)
    phases: list[bool] = []
    engine.on_phase = phases.append  # the server sets compute threads per phase (tests/test_server.py)
    steps = 0
    while late.first_step is None:
        before = [len(r.deltas) for r in running]
        prefilled = engine.stats.prefill_tokens
        engine.step()
        steps += 1
        assert engine.stats.prefill_tokens - prefilled <= 8  # the budget per step
        # every step still decoded a token for each running row
        assert engine.stats.decoded_rows >= 2 * (1 + steps)
        assert all(r.result is None for r in running) and before is not None
    assert steps == -(-prompt // 8)  # ceil: one chunk per step
    assert phases == [True, False] * steps  # each step: a chunk of the prompt, then the decode
    phases.clear()
    engine.step()
    assert phases == [False]  # nothing waiting: decode only
    _run(engine)
    solo = predictor.generate([long_request])[0]
    assert late.result.token_ids == solo.token_ids


def test_prefill_order_is_first_come_first_served_and_respects_max_rows():
    model = lively_model()
    engine = Engine(Predictor(model), max_rows=2, prefill_chunk=1000)
    config = GenerationConfig(max_new_tokens=3, eos_token_ids=[-1])
    recs = [_add(engine, ChatRequest(user_turn(f"q{i}"), [], config)) for i in range(4)]
    engine.step()
    assert engine.batch.size == 2 and engine.queued == 2  # two wait for a free row
    assert recs[0].first_step is not None and recs[1].first_step is not None
    assert recs[2].first_step is None and recs[3].first_step is None
    _run(engine)
    assert recs[2].first_step <= recs[3].first_step
    assert all(r.result.completion_tokens == 3 for r in recs)


def test_image_features_are_cached_by_bytes_and_model():
    model = lively_model(**ARCHITECTURES["qformer"])
    predictor = Predictor(model)
    calls = []
    model.vision.register_forward_hook(lambda *a: calls.append(1))
    cache = ImageFeatureCache(max_bytes=2**20)
    engine = Engine(predictor, image_cache=cache)
    config = GenerationConfig(max_new_tokens=4, eos_token_ids=[-1])
    image = random_image(9)

    def ask(key: str, img=image):
        rec = _add(engine, ChatRequest(user_turn("what?", 1), [img], config, image_keys=[key]))
        _run(engine)
        return rec.result

    first = ask("abc")
    assert (cache.hits, cache.misses, len(calls)) == (0, 1, 1)
    again = ask("abc")
    assert (cache.hits, cache.misses, len(calls)) == (1, 1, 1)  # no tower call
    assert (
        again.token_ids
        == first.token_ids
        == predictor.generate([ChatRequest(user_turn("what?", 1), [image], config)])[0].token_ids
    )
    ask("other", random_image(10))
    assert cache.misses == 2 and len(cache) == 2
    # keyed by the model too: another model's engine sharing the cache misses
    other = Engine(Predictor(lively_model()), image_cache=cache)
    rec = _add(other, ChatRequest(user_turn("what?", 1), [image], config, image_keys=["abc"]))
    _run(other)
    assert cache.misses == 3 and rec.result is not None


def test_the_image_cache_is_bounded_least_recently_used_first():
    cache = ImageFeatureCache(max_bytes=3 * 4 * 100)  # three [1, 10, 10] float32 tensors
    for key in "abc":
        cache.put(key, torch.zeros(1, 10, 10))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(1, 10, 10))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert cache.evictions == 1 and cache.nbytes == 1200
    cache.put("huge", torch.zeros(1000))  # larger than the cache: not kept, nothing evicted
    assert "huge" not in cache._items and len(cache) == 3
    off = ImageFeatureCache(0)
    off.put("a", torch.zeros(1))
    assert off.get("a") is None


def test_prepacked_linears_compute_what_the_plain_ones_do():
    from vlmkit.infer.prepack import PackedLinear, available, prepack_linears

    if not available():
        pytest.skip("PyTorch without oneDNN")
    model = lively_model(**ARCHITECTURES["xattn"])
    requests = [
        ChatRequest(user_turn("what is it?", 1), [random_image(1)], GenerationConfig(max_new_tokens=6))
    ]
    expected = Predictor(model).generate(requests)[0].token_ids
    keys = set(model.state_dict())
    batch = Predictor(model).prepare(requests)[0]
    with torch.no_grad():
        logits = model(**batch).logits
    assert prepack_linears(model) > 0
    assert any(isinstance(m, PackedLinear) for m in model.llm.modules())
    assert any(isinstance(m, PackedLinear) for m in model.fusion.modules())  # xattn blocks too
    assert set(model.state_dict()) == keys  # same weights, same names: saving is unchanged
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, logits, atol=1e-4)
    assert Predictor(model).generate(requests)[0].token_ids == expected
    engine = Engine(Predictor(model))
    rec = _add(engine, requests[0])
    _run(engine)
    assert rec.result.token_ids == expected
    bf16 = lively_model().to(torch.bfloat16)
    prepack_linears(bf16)
    assert Predictor(bf16).generate(requests)[0].completion_tokens == 6


def test_fused_projections_compute_what_the_separate_ones_do():
    from vlmkit.infer.prepack import FusedProjection, available, fuse_projections, prepack_linears

    if not available():
        pytest.skip("PyTorch without oneDNN")
    model = lively_model()
    requests = [
        ChatRequest(user_turn("what is it?", 1), [random_image(1)], GenerationConfig(max_new_tokens=6)),
        ChatRequest(
            user_turn("and this one, in detail?", 1), [random_image(2)], GenerationConfig(max_new_tokens=9)
        ),
    ]
    expected = [r.token_ids for r in Predictor(model).generate(requests)]
    keys = set(model.state_dict())
    batch = Predictor(model).prepare(requests[:1])[0]
    with torch.no_grad():
        logits = model(**batch).logits
    layers = len(model.llm.layers)
    assert fuse_projections(model) == 2 * layers  # q/k/v and gate/up of every decoder layer
    prepack_linears(model)
    attn = model.llm.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedProjection) for n in ("q_proj", "k_proj", "v_proj"))
    assert set(model.state_dict()) == keys  # the projections keep their own weights: saving is unchanged
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, logits, atol=1e-4)
        x = torch.randn(3, model.llm.hidden_size)
        mlp = model.llm.layers[0].mlp
        # a part asked twice for one input, or for another input, computes again: never a stale output
        assert torch.allclose(mlp.gate_proj(x), x @ mlp.gate_proj.weight.T, atol=1e-5)
        assert torch.allclose(mlp.gate_proj(x), x @ mlp.gate_proj.weight.T, atol=1e-5)
        y = torch.randn(3, model.llm.hidden_size)
        assert torch.allclose(mlp.up_proj(y), y @ mlp.up_proj.weight.T, atol=1e-5)
    assert [r.token_ids for r in Predictor(model).generate(requests)] == expected
    engine = Engine(Predictor(model), max_rows=2)
    recs = [_add(engine, r) for r in requests]
    _run(engine)
    assert [rec.result.token_ids for rec in recs] == expected


def test_rows_starting_together_have_their_images_encoded_in_one_tower_call():
    model = lively_model()
    predictor = Predictor(model)
    calls = []
    model.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    greedy = GenerationConfig(max_new_tokens=5, eos_token_ids=[-1])
    requests = [
        ChatRequest(user_turn("what is in the picture?", 1), [random_image(1)], greedy),
        ChatRequest(user_turn("compare the two", 2), [random_image(2, (60, 30)), random_image(3)], greedy),
        ChatRequest(user_turn("hello there"), [], greedy),
        ChatRequest(user_turn("and this one?", 1), [random_image(4)], greedy),
    ]
    solo = [predictor.generate([r])[0].token_ids for r in requests]
    calls.clear()
    engine = Engine(predictor, max_rows=3, image_cache=ImageFeatureCache(2**20))
    recs = [_add(engine, r) for r in requests]
    engine.step()
    assert calls == [3]  # the three rows with room started together: their 3 images in one call
    _run(engine)
    assert calls == [3, 1]  # the fourth waited for a free row
    assert [rec.result.token_ids for rec in recs] == solo
    # groups hold at most `prefill_chunk` prompt tokens while rows decode, `prefill_burst` while none does: with
    # room for one prompt, one tower call per row
    calls.clear()
    one = engine.prepare(requests[0]).prompt_tokens
    engine = Engine(predictor, max_rows=3, prefill_chunk=one, prefill_burst=one)
    recs = [_add(engine, r) for r in requests]
    _run(engine)
    assert calls == [1, 2, 1]
    assert [rec.result.token_ids for rec in recs] == solo

    # a bad image among them: the batched call fails, each row meets its own error, the others are answered
    class NotAnImage:  # has a size (the prompt is built), has no pixels (the tower's input fails)
        size = (32, 32)

    engine = Engine(predictor, max_rows=4)
    ok = _add(engine, requests[0])
    bad = _add(engine, ChatRequest(user_turn("what?", 1), [NotAnImage()], greedy))
    _run(engine)
    assert ok.result.token_ids == solo[0] and not ok.errors
    assert len(bad.errors) == 1 and bad.result is None


def test_build_predictor_fuses_the_llm_projections_when_it_prepacks(tmp_path):
    from vlmkit.infer.prepack import FusedProjection, available
    from vlmkit.infer.server import build_predictor

    if not available():
        pytest.skip("PyTorch without oneDNN")
    model = lively_model()
    requests = [
        ChatRequest(user_turn("what is it?", 1), [random_image(1)], GenerationConfig(max_new_tokens=6))
    ]
    expected = Predictor(model).generate(requests)[0].token_ids
    model.save_pretrained(tmp_path / "model")

    def fused(module) -> int:
        return sum(isinstance(m, FusedProjection) for m in module.modules())

    served = build_predictor(tmp_path / "model", prepack=True)
    assert fused(served.model.llm) == 5 * len(served.model.llm.layers)  # q, k, v, gate, up
    assert fused(served.model) == fused(served.model.llm)  # the tower and bridge are left alone
    assert served.generate(requests)[0].token_ids == expected
    assert fused(build_predictor(tmp_path / "model", prepack=True, fuse=False).model) == 0
