"""Data formats: LLaVA, caption pairs, OpenAI messages, Qwen-VL records -> `Sample`; errors carry reasons."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlmkit.data.dataset import DataReport, read_samples
from vlmkit.data.formats import (
    Message,
    SampleError,
    detect_format,
    merge_image_turns,
    parse_record,
    read_records,
)
from vlmkit.data.records import DataError
from vlmkit.data.samples import weight_tasks

IMG = {"type": "image"}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def llava(image, *turns, **extra) -> dict:
    roles = ["human", "gpt"]
    convs = [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)]
    return (
        {"image": image, "conversations": convs, **extra}
        if image is not None
        else {"conversations": convs, **extra}
    )


def reason_of(record: dict, fmt: str = "auto") -> tuple[str, str | None]:
    with pytest.raises(SampleError) as info:
        parse_record(record, fmt, index=7)
    return info.value.reason, info.value.sample_id


# ------------------------------------------------------------------------------------------------------ LLaVA
def test_llava_marker_position_meta_and_id():
    rec = llava("a.png", "<image>\nWhat color?", "red", id="s1", task="attribute_qa", answer="red")
    s = parse_record(rec)
    assert detect_format(rec) == "llava"
    assert s.id == "s1"
    assert s.images == ["a.png"]
    assert s.messages == [
        Message("user", [IMG, text("\nWhat color?")]),
        Message("assistant", [text("red")]),
    ]
    assert s.meta == {"task": "attribute_qa", "answer": "red"}


def test_llava_multi_image_list_keeps_positions():
    s = parse_record(llava(["a.png", "b.png"], "Left <image> right <image>?", "same"))
    assert s.images == ["a.png", "b.png"]
    assert s.messages[0].content == [text("Left "), IMG, text(" right "), IMG, text("?")]


def test_llava_image_without_marker_goes_to_start_of_first_human_turn():
    rec = {
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "A circle."},
        ],
    }
    s = parse_record(rec, index=3)
    assert s.id == "3"  # no id in the record: the index
    assert [m.role for m in s.messages] == ["system", "user", "assistant"]
    assert s.messages[1].content == [IMG, text("Describe it.")]


def test_llava_accepts_user_assistant_roles_and_text_only():
    rec = {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}
    s = parse_record(rec)
    assert s.images == []
    assert [m.role for m in s.messages] == ["user", "assistant"]


def test_llava_leading_gpt_turn_is_dropped():
    rec = {
        "conversations": [
            {"from": "gpt", "value": "stray"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    s = parse_record(rec)
    assert [m.text for m in s.messages] == ["Hi", "Hello"]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (llava("a.png", "<image> and <image>?", "x"), "image_count_mismatch"),
        (llava(["a.png", "b.png"], "<image> only one", "x"), "image_count_mismatch"),
        (llava(None, "<image> no image", "x"), "image_count_mismatch"),
        (llava("a.png", "<image> question"), "no_assistant_turn"),
        (llava("a.png", "<image> question", "   "), "no_assistant_turn"),
        ({"image": "a.png", "conversations": "nope"}, "bad_schema"),
        (
            {"image": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "bad_schema",
        ),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "bad_schema"),
        ({"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}, "bad_schema"),
        ({"something": "else"}, "bad_schema"),
    ],
)
def test_llava_errors_have_reasons_and_ids(record, reason):
    got, sid = reason_of({**record, "id": "bad-1"})
    assert got == reason
    assert sid == "bad-1"


def test_unknown_format_name_raises_value_error():
    with pytest.raises(ValueError, match="known: auto"):
        parse_record({"conversations": []}, "sharegpt4")


# --------------------------------------------------------------------------------------------------- captions
def test_caption_pair_becomes_alignment_sample_with_deterministic_instruction():
    instructions = ["Describe the image.", "Caption this.", "What is shown?"]
    rec = {"image": "c.png", "caption": "A red circle."}
    assert detect_format(rec) == "captions"
    s = parse_record(rec, index=4, caption_instructions=instructions, seed=1)
    assert s.images == ["c.png"]
    assert s.messages[0].content[0] == IMG
    assert s.messages[0].text in instructions
    assert s.messages[1] == Message("assistant", [text("A red circle.")])
    again = parse_record(rec, index=4, caption_instructions=instructions, seed=1)
    assert again.messages[0].text == s.messages[0].text
    drawn = {
        parse_record(rec, index=i, caption_instructions=instructions).messages[0].text for i in range(30)
    }
    assert drawn == set(instructions)  # every instruction gets used across indices
    by_seed = [
        parse_record(rec, index=0, caption_instructions=instructions, seed=k).messages[0].text
        for k in range(30)
    ]
    assert len(set(by_seed)) > 1  # the seed changes the draw


def test_caption_errors():
    assert reason_of({"image": "c.png", "caption": ""}, "captions")[0] == "no_assistant_turn"
    assert reason_of({"image": "c.png", "caption": 3}, "captions")[0] == "bad_schema"
    assert reason_of({"caption": "x"}, "captions")[0] == "bad_schema"


# --------------------------------------------------------------------------------------------------- messages
def test_openai_messages_with_image_url_parts_kept_as_given():
    data_url = "data:image/png;base64,iVBORw0KGgo="
    rec = {
        "id": "m1",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "image_url", "image_url": {"url": "imgs/b.jpg"}},
                    {"type": "text", "text": "please."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
        ],
        "source": "unit",
    }
    assert detect_format(rec) == "messages"
    s = parse_record(rec)
    assert s.images == [data_url, "imgs/b.jpg"]
    assert s.messages[0] == Message("system", [text("You are terse.")])
    assert s.messages[1].content == [text("Compare "), IMG, IMG, text("please.")]
    assert s.messages[2].text == "Same."
    assert s.meta == {"source": "unit"}


def test_messages_with_top_level_images_list():
    rec = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A star."},
            {"role": "user", "content": "<image>\nAnd this?"},
            {"role": "assistant", "content": "A cross."},
        ],
        "images": ["one.png", "two.png"],
    }
    s = parse_record(rec)
    assert s.images == ["one.png", "two.png"]
    assert s.messages[2].content == [IMG, text("\nAnd this?")]


def test_messages_errors():
    one_image = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]
    assert reason_of({"messages": one_image})[0] == "image_count_mismatch"
    assert reason_of({"messages": one_image, "images": ["a.png", "b.png"]})[0] == "image_count_mismatch"
    assert reason_of({"messages": [{"role": "user", "content": "hi"}]})[0] == "no_assistant_turn"
    assert reason_of({"messages": [{"role": "user", "content": 5}]})[0] == "bad_schema"
    bad_part = [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]
    assert reason_of({"messages": bad_part})[0] == "bad_schema"


# ------------------------------------------------------------------------------------------------------- qwen
def test_qwen_img_tags_become_image_parts():
    rec = {
        "id": "q1",
        "conversations": [
            {
                "from": "user",
                "value": "Picture 1: <img>a.png</img>\nPicture 2: <img>/abs/b.png</img>\nSame shape?",
            },
            {"from": "assistant", "value": "<ref>the circle</ref><box>(1,2),(3,4)</box>"},
        ],
    }
    assert detect_format(rec) == "qwen"
    s = parse_record(rec)
    assert s.images == ["a.png", "/abs/b.png"]
    assert s.messages[0].content == [
        text("Picture 1: "),
        IMG,
        text("\nPicture 2: "),
        IMG,
        text("\nSame shape?"),
    ]
    assert s.messages[1].text == "<ref>the circle</ref><box>(1,2),(3,4)</box>"  # grounding tags stay text


def test_qwen_errors():
    empty = {
        "conversations": [{"from": "user", "value": "<img> </img>"}, {"from": "assistant", "value": "x"}]
    }
    assert reason_of(empty, "qwen")[0] == "bad_schema"
    marker = {
        "conversations": [
            {"from": "user", "value": "<img>a.png</img> <image>"},
            {"from": "assistant", "value": "x"},
        ]
    }
    assert reason_of(marker)[0] == "image_count_mismatch"


# --------------------------------------------------------------------------------------------------- files
def test_read_records_json_list(tmp_path):
    path = tmp_path / "data.json"
    recs = [llava("a.png", "<image>\nq", "a", id=f"r{i}") for i in range(3)]
    path.write_text(json.dumps(recs, indent=2))
    assert [(i, r["id"]) for i, r in read_records(path)] == [(0, "r0"), (1, "r1"), (2, "r2")]


def test_jsonl_malformed_line_is_counted_not_raised(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"image": "a.png", "caption": "A red circle."}),
        '{"image": "b.png", "caption": "broken',  # malformed JSON
        "",
        json.dumps(llava("c.png", "<image> and <image>", "x", id="mismatch")),
        json.dumps([1, 2]),  # valid JSON, not an object
        json.dumps(llava("d.png", "<image>\nq", "a", id="good")),
    ]
    path.write_text("\n".join(lines) + "\n")
    items = list(read_records(path))
    assert [i for i, _ in items] == [0, 1, 3, 4, 5]
    assert isinstance(items[1][1], Exception)

    report = DataReport(source=str(path))
    samples = read_samples(path, report=report)
    assert [s.id for s in samples] == ["0", "good"]
    assert report.rejected == {"malformed_json": 1, "bad_schema": 1, "image_count_mismatch": 1}
    assert report.examples == {
        "malformed_json": "line 2",
        "bad_schema": "line 5",
        "image_count_mismatch": "mismatch",
    }


# ------------------------------------------------------------------------------------------ merging turns
def test_merge_image_turns_one_conversation_per_image():
    recs = [
        llava("a.png", "<image>\nWhat color?", "red", id="a1", task="attribute_qa"),
        llava("b.png", "<image>\nHow many?", "2", id="b1", task="counting"),
        llava("a.png", "<image>\nHow many?", "1", id="a2", task="counting"),
        llava(None, "Hello?", "Hi.", id="t1"),
        llava("a.png", "Is it round? <image>", "yes", id="a3", task="pope"),
    ]
    samples = [parse_record(r) for r in recs]
    merged = merge_image_turns(samples)
    assert [m.images for m in merged] == [["a.png"], ["b.png"], []]  # first-appearance order, text-only kept
    a = merged[0]
    assert sorted(a.meta["merged_ids"]) == ["a1", "a2", "a3"]
    assert a.id == a.meta["merged_ids"][0]
    assert sorted(a.meta["tasks"]) == ["attribute_qa", "counting", "pope"]
    assert [m.role for m in a.messages] == ["user", "assistant"] * 3
    assert sum(m.num_images for m in a.messages) == 1 and a.messages[0].num_images == 1
    pairs = {a.messages[i].text.strip(): a.messages[i + 1].text for i in range(0, 6, 2)}
    assert pairs == {"What color?": "red", "How many?": "1", "Is it round?": "yes"}
    assert not any(
        m.text.startswith("\n") for m in a.messages[2:]
    )  # the marker's newline left with the image
    assert merged[1] is samples[1]  # a single record per image passes through
    assert merge_image_turns(samples) == merged  # deterministic


def test_merge_image_turns_shuffles_which_question_comes_first():
    recs = [
        llava(f"{i}.png", "<image>\n" + q, "x", id=f"{i}-{q}", task=q)
        for i in range(40)
        for q in ("caption", "count", "color")
    ]
    merged = merge_image_turns([parse_record(r) for r in recs])
    assert len(merged) == 40
    firsts = {m.meta["tasks"][0] for m in merged}
    assert firsts == {"caption", "count", "color"}


# ------------------------------------------------------------------------------------------- task mixture
def _tasks(n: int, task: str) -> list:
    return [parse_record(llava("a.png", "<image>\nQ?", "A.", id=f"{task}{i}", task=task)) for i in range(n)]


def test_task_weights_repeat_records_by_task_the_same_way_every_run():
    samples = _tasks(100, "counting") + _tasks(100, "caption") + _tasks(100, "pope")
    mixed = weight_tasks(samples, {"counting": 2.5, "caption": 0})
    ids = Counter(s.id for s in mixed)
    tasks = Counter(s.meta["task"] for s in mixed)
    assert tasks["caption"] == 0 and tasks["pope"] == 100  # dropped; unlisted: weight 1
    assert 230 <= tasks["counting"] <= 270  # 2 copies each, a third for about half of them
    assert {ids[f"counting{i}"] for i in range(100)} == {2, 3}
    assert weight_tasks(samples, {"counting": 2.5, "caption": 0}) == mixed  # deterministic
    assert weight_tasks(samples, {"counting": 2.5}, seed=1) != mixed  # the seed picks the extra copies


def test_task_weights_refuse_unknown_tasks_and_negative_weights():
    samples = _tasks(4, "counting")
    with pytest.raises(DataError, match="countng"):
        weight_tasks(samples, {"countng": 2.0}, "data.json")
    with pytest.raises(ValueError, match=">= 0"):
        weight_tasks(samples, {"counting": -1.0})
    with pytest.raises(DataError, match="leave no sample"):
        weight_tasks(samples, {"counting": 0.0})
