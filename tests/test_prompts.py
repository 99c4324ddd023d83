"""Prompt rendering, placeholder expansion, assistant-only labels and truncation, pinned by golden strings."""

from __future__ import annotations

import pytest

from vlmkit.config import LLMConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import Message, Sample, SampleError, parse_record
from vlmkit.data.prompts import (
    BUILTIN_TEMPLATES,
    EncodedSample,
    encode_sample,
    render_prompt,
    resolve_template,
)
from vlmkit.models.llm import build_llm
from vlmkit.templates import CHATML_TEMPLATE

VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def tok():
    """The tiny test tokenizer (ChatML template, `<|im_end|>` as EOS) with `<image>` as a special token."""
    return build_llm(LLMConfig.make("tiny")).tokenizer


def conversation(image: str | None = "a.png", *turns: str, sid: str = "s1") -> Sample:
    roles = ["human", "gpt"]
    rec = {"id": sid, "conversations": [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)]}
    if image is not None:
        rec["image"] = image
    return parse_record(rec)


SINGLE = ("<image>\nWhat color is the circle?", "red")
MULTI = ("<image>\nWhat color is the circle?", "red", "How many shapes?", "two")


def labelled_runs(enc: EncodedSample, tok) -> list[str]:
    """The decoded runs of consecutive loss-carrying tokens (one per assistant turn)."""
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            assert lab == tid  # labels are unshifted copies of the ids
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def check_golden(enc: EncodedSample, tok, expected_text: str, expected_runs: list[str]) -> None:
    # tokenizing the golden string in one go gives exactly the ids that were labelled
    assert tok(expected_text, add_special_tokens=False)["input_ids"] == enc.input_ids
    assert tok.decode(enc.input_ids) == expected_text
    assert labelled_runs(enc, tok) == expected_runs
    assert len(enc.labels) == len(enc.input_ids)


# --------------------------------------------------------------------------------------------- golden: ChatML
def test_chatml_single_turn_golden(tok):
    enc = encode_sample(conversation("a.png", *SINGLE), tok, tokens_per_image=2)
    expected = (
        "<|im_start|>user\n<image><image>\nWhat color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    check_golden(enc, tok, expected, ["red<|im_end|>"])
    assert enc.id == "s1" and enc.images == ["a.png"] and enc.num_tiles == [1]


def test_chatml_multi_turn_golden(tok):
    enc = encode_sample(conversation("a.png", *MULTI), tok, tokens_per_image=1)
    expected = (
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nHow many shapes?<|im_end|>\n"
        "<|im_start|>assistant\ntwo<|im_end|>\n"
    )
    check_golden(enc, tok, expected, ["red<|im_end|>", "two<|im_end|>"])


def test_chatml_system_prompt_is_a_masked_system_turn(tok):
    enc = encode_sample(conversation("a.png", *SINGLE), tok, tokens_per_image=1, system_prompt="Be brief.")
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    check_golden(enc, tok, expected, ["red<|im_end|>"])


# --------------------------------------------------------------------------------------------- golden: Vicuna
def test_vicuna_v1_single_turn_golden(tok):
    enc = encode_sample(conversation("a.png", *SINGLE), tok, tokens_per_image=2, template="vicuna_v1")
    expected = f"{VICUNA_SYS} USER: <image><image>\nWhat color is the circle? ASSISTANT: red<|im_end|>"
    check_golden(enc, tok, expected, [" red<|im_end|>"])  # EOS ends the assistant turn


def test_vicuna_v1_multi_turn_golden(tok):
    sample = conversation("a.png", "<image>\nWhat is in the image?", "a circle", "Where?", "on the left")
    enc = encode_sample(sample, tok, tokens_per_image=1, template="vicuna_v1")
    expected = (
        f"{VICUNA_SYS} USER: <image>\nWhat is in the image? ASSISTANT: a circle<|im_end|>"
        "USER: Where? ASSISTANT: on the left<|im_end|>"
    )
    check_golden(enc, tok, expected, [" a circle<|im_end|>", " on the left<|im_end|>"])


def test_vicuna_v1_system_message_replaces_default(tok):
    enc = encode_sample(
        conversation(None, "Hi", "hello"),
        tok,
        tokens_per_image=1,
        template="vicuna_v1",
        system_prompt="Be brief.",
    )
    check_golden(enc, tok, "Be brief. USER: Hi ASSISTANT: hello<|im_end|>", [" hello<|im_end|>"])


def test_vicuna_generation_prompt_is_a_prefix_of_training_text(tok):
    sample = conversation("a.png", *SINGLE)
    prompt = render_prompt(sample.messages[:1], tok, template="vicuna_v1", tokens_per_image=2)
    assert prompt == f"{VICUNA_SYS} USER: <image><image>\nWhat color is the circle? ASSISTANT:"
    enc = encode_sample(sample, tok, tokens_per_image=2, template="vicuna_v1")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: len(prompt_ids)])
    assert enc.labels[len(prompt_ids)] != IGNORE_INDEX  # the first generated token carries loss


# ------------------------------------------------------------------------------------------------ plain
def test_plain_template_labels_caption_and_eos_only(tok):
    sample = parse_record({"image": "c.png", "caption": "a red circle"}, caption_instructions=["Describe."])
    enc = encode_sample(sample, tok, tokens_per_image=3, template="plain")
    check_golden(enc, tok, "<image><image><image>a red circle<|im_end|>", ["a red circle<|im_end|>"])
    assert render_prompt(sample.messages[:1], tok, template="plain", tokens_per_image=3) == "<image>" * 3


# ------------------------------------------------------------------------------------------------ templates
def test_resolve_template(tok):
    assert resolve_template(tok) == CHATML_TEMPLATE  # the tokenizer's own
    assert resolve_template(tok, "vicuna_v1") == BUILTIN_TEMPLATES["vicuna_v1"]
    assert resolve_template(tok, "{{ 'x' }}") == "{{ 'x' }}"
    with pytest.raises(ValueError, match="chatml, vicuna_v1, plain"):
        resolve_template(tok, "llama9")


def test_auto_template_falls_back_to_chatml(tok):
    own = tok.chat_template
    tok.chat_template = None
    try:
        assert resolve_template(tok, "auto") == BUILTIN_TEMPLATES["chatml"]
    finally:
        tok.chat_template = own


def test_render_prompt_for_inference(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = render_prompt(msgs, tok, tokens_per_image=lambda tiles: 2 * tiles, num_tiles=[2])
    assert (
        text
        == "<|im_start|>user\n<image><image><image><image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(SampleError) as info:
        render_prompt([{"role": "user", "content": "<image> and <image>"}], tok, num_tiles=[1])
    assert info.value.reason == "image_count_mismatch"


# ----------------------------------------------------------------------------------------------- placeholders
def test_placeholder_expansion_count_fixed_per_image(tok):
    sample = conversation(["a.png", "b.png"], "<image> vs <image>: same?", "no")
    image_id = tok.convert_tokens_to_ids("<image>")
    enc = encode_sample(sample, tok, tokens_per_image=5)
    assert enc.input_ids.count(image_id) == 5 * 2
    assert all(lab == IGNORE_INDEX for tid, lab in zip(enc.input_ids, enc.labels) if tid == image_id)


def test_placeholder_expansion_with_tiles_uses_callable(tok):
    sample = conversation(["a.png", "b.png"], "<image> vs <image>: same?", "no")
    image_id = tok.convert_tokens_to_ids("<image>")
    enc = encode_sample(sample, tok, tokens_per_image=lambda tiles: 4 * tiles, num_tiles=[1, 3])
    assert enc.input_ids.count(image_id) == 4 + 12
    runs = "".join("I" if t == image_id else "." for t in enc.input_ids).split(".")
    assert sorted(len(r) for r in runs if r) == [4, 12]  # one contiguous run per image
    assert enc.num_tiles == [1, 3]
    with pytest.raises(SampleError) as info:
        encode_sample(sample, tok, tokens_per_image=1, num_tiles=[1])
    assert info.value.reason == "image_count_mismatch"


def test_placeholders_inside_an_assistant_turn_carry_no_loss(tok):
    sample = conversation("a.png", "Draw it.", "here: <image> done")
    enc = encode_sample(sample, tok, tokens_per_image=3)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == 3
    assert labelled_runs(enc, tok) == ["here: ", " done<|im_end|>"]


def test_literal_image_token_in_text_is_a_count_mismatch(tok):
    sample = Sample(
        "lit",
        [
            Message("user", [{"type": "text", "text": "what is <image>?"}]),
            Message("assistant", [{"type": "text", "text": "a tag"}]),
        ],
        [],
    )
    with pytest.raises(SampleError) as info:
        encode_sample(sample, tok, tokens_per_image=1)
    assert (info.value.reason, info.value.sample_id) == ("image_count_mismatch", "lit")


# ------------------------------------------------------------------------------------------------ truncation
def three_rounds() -> Sample:
    return conversation(
        ["a.png", "b.png"],
        "<image>\nWhat color?",
        "red",
        "How many shapes?",
        "two",
        "<image>\nAnd here?",
        "blue",
        sid="long",
    )


def test_truncation_drops_later_rounds_whole(tok):
    full = encode_sample(three_rounds(), tok, tokens_per_image=8)
    two = encode_sample(
        conversation("a.png", "<image>\nWhat color?", "red", "How many shapes?", "two"),
        tok,
        tokens_per_image=8,
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    assert full.input_ids.count(image_id) == 16
    # every budget between "two rounds" and "all three" keeps exactly the first two rounds, never part of the
    # third round's placeholder run
    for budget in range(len(two.input_ids), len(full.input_ids)):
        enc = encode_sample(three_rounds(), tok, tokens_per_image=8, max_length=budget)
        assert enc.input_ids == two.input_ids
        assert enc.labels == two.labels
        assert enc.images == ["a.png"] and enc.num_tiles == [1]
        assert enc.input_ids.count(image_id) == 8
    assert labelled_runs(two, tok) == ["red<|im_end|>", "two<|im_end|>"]
    enc = encode_sample(three_rounds(), tok, tokens_per_image=8, max_length=len(full.input_ids))
    assert enc.input_ids == full.input_ids and enc.images == ["a.png", "b.png"]


def test_too_long_when_first_round_does_not_fit(tok):
    with pytest.raises(SampleError) as info:
        encode_sample(three_rounds(), tok, tokens_per_image=600, max_length=512)
    assert (info.value.reason, info.value.sample_id) == ("too_long", "long")
    first = encode_sample(conversation("a.png", "<image>\nWhat color?", "red"), tok, tokens_per_image=8)
    assert encode_sample(
        three_rounds(), tok, tokens_per_image=8, max_length=len(first.input_ids)
    ).input_ids == (first.input_ids)
    with pytest.raises(SampleError, match="too_long"):
        encode_sample(three_rounds(), tok, tokens_per_image=8, max_length=len(first.input_ids) - 1)


# ------------------------------------------------------------------------------------------------ masking
def test_all_labels_masked_when_template_drops_assistant_text(tok):
    users_only = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(SampleError) as info:
        encode_sample(conversation("a.png", *SINGLE), tok, tokens_per_image=1, template=users_only)
    assert info.value.reason == "all_labels_masked"


def test_all_labels_masked_for_empty_assistant_text(tok):
    sample = Sample(
        "empty",
        [
            Message("user", [{"type": "text", "text": "hi"}]),
            Message("assistant", [{"type": "text", "text": ""}]),
        ],
        [],
    )
    with pytest.raises(SampleError) as info:
        encode_sample(sample, tok, tokens_per_image=1)
    assert (info.value.reason, info.value.sample_id) == ("all_labels_masked", "empty")


def test_conversation_must_start_with_user(tok):
    sample = Sample("a-first", [Message("assistant", [{"type": "text", "text": "hi"}])], [])
    with pytest.raises(SampleError, match="bad_schema"):
        encode_sample(sample, tok, tokens_per_image=1)


def test_qwen_record_end_to_end(tok):
    rec = {
        "id": "q",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nSame?"},
            {"from": "assistant", "value": "yes"},
        ],
    }
    enc = encode_sample(parse_record(rec), tok, tokens_per_image=3)
    expected = (
        "<|im_start|>user\nPicture 1: <image><image><image>\n"
        "Picture 2: <image><image><image>\nSame?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n"
    )
    check_golden(enc, tok, expected, ["yes<|im_end|>"])
    assert enc.images == ["a.png", "b.png"]


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_template_golden():
    from transformers import AutoTokenizer

    from vlmkit.models.llm import SMOLLM2_GGUF, smollm2_dir

    smol = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    smol.add_special_tokens({"additional_special_tokens": ["<image>"]})
    sample = conversation("a.png", *MULTI)
    enc = encode_sample(sample, smol, tokens_per_image=2)
    default_system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    body = (
        "<|im_start|>user\n<image><image>\nWhat color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nHow many shapes?<|im_end|>\n"
        "<|im_start|>assistant\ntwo<|im_end|>\n"
    )
    check_golden(enc, smol, default_system + body, ["red<|im_end|>", "two<|im_end|>"])
    enc = encode_sample(sample, smol, tokens_per_image=2, system_prompt="Be brief.")
    check_golden(
        enc, smol, "<|im_start|>system\nBe brief.<|im_end|>\n" + body, ["red<|im_end|>", "two<|im_end|>"]
    )
    prompt = render_prompt(sample.messages[:1], smol, tokens_per_image=2)
    assert prompt == default_system + body.split("red<|im_end|>")[0]
