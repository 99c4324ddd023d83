"""The server's prefix cache (infer/prefix_cache.py): a prompt that starts like an earlier prompt (or an earlier
prompt and its answer) reuses those keys and values instead of prefilling them, and gets the answer a full prefill
gives — one row at a time, several prompts together, transformers' forward; images and image-gated adapters
keep prompts apart; xattn rows with images are never reused."""

from __future__ import annotations

import pytest
import torch

from vlmkit.infer.engine import Engine, RowSink
from vlmkit.infer.generate import ChatRequest, Predictor
from vlmkit.infer.prefix_cache import PrefixCache, content_key
from vlmkit.models.fusion.xattn import XAttnFusionConfig
from vlmkit.models.generation import GenerationConfig

from conftest import lively_model, random_image, user_turn

GREEDY = GenerationConfig(max_new_tokens=6, eos_token_ids=[-1])
SYSTEM = "You are a careful assistant. Answer in one short sentence, and say so when you are not sure."


def _chat(question: str, images: int = 0) -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, *user_turn(question, images)]


class _Rec:
    def __init__(self) -> None:
        self.result = None
        self.sink = RowSink(on_done=self._done)

    def _done(self, result) -> None:
        self.result = result


def _serve(engine: Engine, requests: list[ChatRequest]) -> list[list[int]]:
    """Add `requests` at once and run the engine until all are answered -> their tokens."""
    recs = []
    for request in requests:
        rec = _Rec()
        engine.add(engine.prepare(request), rec.sink)
        recs.append(rec)
    for _ in range(500):
        if not engine.busy:
            return [rec.result.token_ids for rec in recs]
        engine.step()
    raise AssertionError("the engine did not finish")


def _forget_slots(engine: Engine) -> None:
    """Zero the KV slots, so that what a later prompt reuses can only come from the prefix cache."""
    for layer in engine.batch.cache.layers:
        if layer.is_initialized:
            layer.keys.zero_()
            layer.values.zero_()


@pytest.mark.parametrize(
    "options",
    [{}, {"prefill_together": False}, {"lean": False}],
    ids=["together", "one-by-one", "transformers-forward"],
)
def test_prompts_sharing_a_system_prompt_reuse_it_and_keep_their_answers(options):
    predictor = Predictor(lively_model())
    requests = [
        ChatRequest(_chat("what is in the picture?", 1), [random_image(1)], GREEDY),
        ChatRequest(_chat("hello there, how are you today?"), [], GREEDY),
        ChatRequest(_chat("compare the two", 2), [random_image(2, (60, 30)), random_image(3)], GREEDY),
        ChatRequest(_chat("and this one?", 1), [random_image(4)], GREEDY),
    ]
    solo = [predictor.generate([r])[0].token_ids for r in requests]
    cache = PrefixCache(2**24)
    engine = Engine(predictor, max_rows=4, prefix_cache=cache, **options)
    assert _serve(engine, requests[:1]) == solo[:1]
    assert engine.stats.reused_tokens == 0 and len(cache) == 1  # nothing to reuse yet; its KV kept at the end
    _forget_slots(engine)
    prefilled = engine.stats.prefill_tokens
    assert _serve(engine, requests[1:]) == solo[1:]
    # each later prompt reused at least the system prompt's tokens; what it reused was not prefilled
    shared = len(predictor.processor.tokenizer(f"{SYSTEM}")["input_ids"])
    assert cache.hits == 3 and engine.stats.reused_tokens >= 3 * shared
    prompts = sum(engine.prepare(r).prompt_tokens for r in requests[1:])
    assert engine.stats.prefill_tokens - prefilled == prompts - engine.stats.reused_tokens
    # without the cache: every token prefilled, the same answers
    plain = Engine(predictor, max_rows=4, **options)
    assert _serve(plain, requests) == solo and plain.stats.reused_tokens == 0


def test_the_next_turn_of_a_conversation_reuses_the_previous_prompt_and_answer():
    predictor = Predictor(lively_model())
    image = random_image(5)
    first = ChatRequest(_chat("what is in the picture?", 1), [image], GREEDY)
    engine = Engine(predictor, max_rows=2, prefix_cache=PrefixCache(2**24))
    (answer,) = _serve(engine, [first])
    _forget_slots(engine)
    text = predictor.processor.tokenizer.decode(answer, skip_special_tokens=True)
    turn = [
        *first.messages,
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
        *user_turn("and its colour?"),
    ]
    second = ChatRequest(turn, [image], GREEDY)
    solo = predictor.generate([second])[0].token_ids
    assert _serve(engine, [second]) == [solo]
    # the whole first prompt (image included) came from the cache, and the answer's tokens as far as they match
    assert engine.stats.reused_tokens >= engine.prepare(first).prompt_tokens


def test_another_image_or_another_adapter_state_does_not_match_past_it():
    model = lively_model()
    tok = model.image_token_id
    ids = torch.tensor([5, 6, tok, tok, 7, 8])
    a = content_key(ids, tok, ["img-a"])
    assert torch.equal(a, content_key(ids, tok, ["img-a"]))
    b = content_key(ids, tok, ["img-b"])
    cache = PrefixCache(2**20)
    kv = [(torch.randn(2, 6, 4), torch.randn(2, 6, 4))]
    cache.put(a, kv)
    assert cache.match(b, 5)[1] == 2  # the text before the image only
    assert cache.match(a, 5)[1] == 5  # everything but the last token
    assert cache.match(a, 3)[1] == 3  # never more than the caller allows
    gated = content_key(ids, tok, ["img-a"], context=2)  # e.g. an image-gated adapter on
    assert cache.match(gated, 5) == (None, 0)
    assert (cache.hits, cache.misses) == (3, 1)


def test_entries_extend_each_other_and_the_oldest_go_first():
    kv = lambda n: [(torch.zeros(1, n, 4), torch.zeros(1, n, 4))]  # noqa: E731 - 32 bytes per position
    cache = PrefixCache(32 * 20)
    cache.put(torch.tensor([0, 1, 2, 3]), kv(3))
    cache.put(torch.tensor([0, 1, 2]), kv(2))  # held already by the longer entry: nothing stored
    assert len(cache) == 1 and cache.nbytes == 32 * 3
    cache.put(torch.tensor([0, 1, 2, 3, 4, 5]), kv(5))  # extends it: replaces it
    assert len(cache) == 1 and cache.nbytes == 32 * 5
    cache.put(torch.tensor([0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]), kv(10))
    cache.put(torch.tensor([0, 8, 8, 8, 8, 8, 8]), kv(6))  # 21 positions > 20: the least recently used goes
    assert len(cache) == 2 and cache.evictions == 1 and cache.nbytes == 32 * 16
    assert cache.match(torch.tensor([0, 1, 2, 3, 4, 5, 6]), 10) == (None, 0)
    cache.put(torch.tensor([0, 7] * 20), kv(39))  # larger than the whole cache: not kept
    assert len(cache) == 2
    with pytest.raises(ValueError):
        PrefixCache(-1)


def test_xattn_rows_with_images_are_neither_kept_nor_reused():
    model = lively_model(fusion=XAttnFusionConfig(mode="xattn", every=1, heads=2))
    predictor = Predictor(model)
    requests = [
        ChatRequest(_chat("what is in the picture?", 1), [random_image(1)], GREEDY),
        ChatRequest(_chat("hello there"), [], GREEDY),
    ]
    solo = [predictor.generate([r])[0].token_ids for r in requests]
    cache = PrefixCache(2**24)
    engine = Engine(predictor, max_rows=2, prefix_cache=cache)
    assert _serve(engine, requests) == solo
    assert len(cache) == 1  # the text row's
    _forget_slots(engine)
    assert _serve(engine, requests[:1]) == solo[:1] and engine.stats.reused_tokens == 0
    assert _serve(engine, requests[1:]) == solo[1:] and engine.stats.reused_tokens > 0
