"""Conversation data formats (LLaVA, caption pairs, OpenAI messages, Qwen-VL `<img>` text) -> one `Sample`."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from vlmkit.config import DataConfig
from vlmkit.constants import IMAGE_MARKER
from vlmkit.data.records import BAD_ENCODING, DataError, SampleError, read_records  # noqa: F401  (re-exported)
from vlmkit.data.samples import (  # noqa: F401  (re-exported)
    Message,
    Sample,
    image_part,
    merge_image_turns,
    select_tasks,
    split_markers,
    text_part,
)
from vlmkit.log import get_logger
from vlmkit.registry import Registry

log = get_logger(__name__)

SAMPLE_ERROR_REASONS = (
    "bad_schema",
    "no_assistant_turn",
    "image_count_mismatch",
    "too_long",
    "all_labels_masked",
)
DEFAULT_CAPTION_INSTRUCTIONS: tuple[str, ...] = tuple(DataConfig().caption_instructions)

_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_QWEN_IMG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


ParseFn = Callable[[dict[str, Any], str, int, Sequence[str], int], Sample]
FORMATS: Registry[ParseFn] = Registry("data format")


# ------------------------------------------------------------------------------------------------ helpers
def _record_id(record: dict[str, Any], index: int) -> str:
    rid = record.get("id")
    return str(index) if rid is None or isinstance(rid, dict | list) else str(rid)


def _role(raw: Any, sid: str) -> str:
    role = _ROLE_ALIASES.get(raw.lower()) if isinstance(raw, str) else None
    if role is None:
        raise SampleError(
            "bad_schema", f"unknown role {raw!r} (known: human/gpt, user/assistant, system)", sample_id=sid
        )
    return role


def _image_refs(value: Any, key: str, sid: str) -> list[str]:
    """A record's image field: absent/None -> [], a string -> [it], a list of strings -> it."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SampleError(
            "bad_schema", f"'{key}' must be a non-empty string or a list of them", sample_id=sid
        )
    return list(value)


def _turns(record: dict[str, Any], sid: str) -> list[tuple[str, str]]:
    """`conversations` as (role, text) pairs (LLaVA / Qwen-VL / ShareGPT: `from` + `value`)."""
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SampleError("bad_schema", "'conversations' must be a non-empty list", sample_id=sid)
    turns = []
    for turn in convs:
        if not isinstance(turn, dict):
            raise SampleError("bad_schema", "each conversation turn must be an object", sample_id=sid)
        raw_role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise SampleError("bad_schema", "each turn needs a string 'value'", sample_id=sid)
        turns.append((_role(raw_role, sid), value))
    return turns


def _finish(sid: str, messages: list[Message], images: list[str], meta: dict[str, Any]) -> Sample:
    """Common checks: leading assistant turns without images dropped (as LLaVA does), a user turn first,
    non-empty assistant turns, one image ref per image part."""
    start = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    while start < len(messages) and messages[start].role == "assistant" and not messages[start].num_images:
        del messages[start]
    if start < len(messages) and messages[start].role != "user":
        raise SampleError("bad_schema", "the conversation must start with a user turn", sample_id=sid)
    assistants = [m for m in messages if m.role == "assistant"]
    if not assistants:
        raise SampleError("no_assistant_turn", "the conversation has no assistant turn", sample_id=sid)
    if any(not m.text.strip() for m in assistants):
        raise SampleError("no_assistant_turn", "an assistant turn has empty text", sample_id=sid)
    n_parts = sum(m.num_images for m in messages)
    if n_parts != len(images):
        raise SampleError(
            "image_count_mismatch", f"{n_parts} image markers but {len(images)} images", sample_id=sid
        )
    return Sample(sid, messages, images, meta)


def _meta(record: dict[str, Any], used: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


# ------------------------------------------------------------------------------------------------ formats
@FORMATS.register("llava")
def parse_llava(
    record: dict[str, Any], sid: str, index: int, instructions: Sequence[str], seed: int
) -> Sample:
    """LLaVA: `image` (string or list), `conversations` of {from: human|gpt, value} with `<image>` markers.

    An image with no marker anywhere goes to the start of the first user turn (LLaVA's behaviour).
    """
    images = _image_refs(record.get("image", record.get("images")), "image", sid)
    messages = [Message(role, split_markers(value)) for role, value in _turns(record, sid)]
    if images and not any(m.num_images for m in messages):
        first_user = next((m for m in messages if m.role == "user"), None)
        if first_user is not None:
            first_user.content[:0] = [image_part() for _ in images]
    return _finish(sid, messages, images, _meta(record, ("id", "image", "images", "conversations")))


@FORMATS.register("qwen")
def parse_qwen(
    record: dict[str, Any], sid: str, index: int, instructions: Sequence[str], seed: int
) -> Sample:
    """Qwen-VL: `conversations` whose text names images inline, `Picture 1: <img>path</img>\\n...`."""
    images: list[str] = []
    messages = []
    for role, value in _turns(record, sid):
        if IMAGE_MARKER in value:
            raise SampleError(
                "image_count_mismatch",
                f"'{IMAGE_MARKER}' marker without an image in Qwen-VL text",
                sample_id=sid,
            )
        parts: list[dict[str, Any]] = []
        for i, chunk in enumerate(_QWEN_IMG.split(value)):
            if i % 2:  # the captured path of an <img>...</img>
                if not chunk.strip():
                    raise SampleError("bad_schema", "empty <img></img> path", sample_id=sid)
                images.append(chunk.strip())
                parts.append(image_part())
            elif chunk:
                parts.append(text_part(chunk))
        messages.append(Message(role, parts))
    return _finish(sid, messages, images, _meta(record, ("id", "conversations")))


def _instruction(instructions: Sequence[str], seed: int, index: int) -> str | None:
    """A caption instruction chosen deterministically from (seed, index)."""
    if not instructions:
        return None
    return instructions[zlib.crc32(f"{seed}:{index}".encode()) % len(instructions)]


@FORMATS.register("captions")
def parse_caption(
    record: dict[str, Any], sid: str, index: int, instructions: Sequence[str], seed: int
) -> Sample:
    """Caption pair {image, caption} -> alignment sample: user = [image, instruction], assistant = caption."""
    images = _image_refs(record.get("image"), "image", sid)
    if not images:
        raise SampleError("bad_schema", "a caption record needs an 'image'", sample_id=sid)
    caption = record.get("caption")
    if not isinstance(caption, str):
        raise SampleError("bad_schema", "'caption' must be a string", sample_id=sid)
    user: list[dict[str, Any]] = [image_part() for _ in images]
    instruction = _instruction(instructions, seed, index)
    if instruction:
        user.append(text_part(instruction))
    messages = [Message("user", user), Message("assistant", [text_part(caption)])]
    return _finish(sid, messages, images, _meta(record, ("id", "image", "caption")))


def _image_url(part: dict[str, Any], sid: str) -> str:
    value = part.get("image_url", part.get("image", part.get("url", part.get("path"))))
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise SampleError("bad_schema", "an image part needs a url", sample_id=sid)
    return value


@FORMATS.register("messages")
def parse_messages(
    record: dict[str, Any], sid: str, index: int, instructions: Sequence[str], seed: int
) -> Sample:
    """OpenAI `messages`: {role, content: str | [{type: text, text} | {type: image_url, image_url: {url}}]}.

    Also accepted: parts {type: image} (or `<image>` markers in string content) that take their refs, in
    order, from a top-level `images` list (the TRL / LLaMA-Factory layout). `image_url` refs are kept as
    given.
    """
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise SampleError("bad_schema", "'messages' must be a non-empty list", sample_id=sid)
    listed = _image_refs(record.get("images"), "images", sid)
    images: list[str] = []
    n_listed = 0  # image parts that take their ref from `images`

    def add_image(parts: list[dict[str, Any]], ref: str | None) -> None:
        nonlocal n_listed
        if ref is None:
            if n_listed < len(listed):
                images.append(listed[n_listed])
            n_listed += 1
        else:
            images.append(ref)
        parts.append(image_part())

    messages = []
    for msg in raw:
        if not isinstance(msg, dict):
            raise SampleError("bad_schema", "each message must be an object", sample_id=sid)
        role = _role(msg.get("role"), sid)
        content = msg.get("content")
        if isinstance(content, str):
            content = [text_part(content)]
        if not isinstance(content, list):
            raise SampleError("bad_schema", "'content' must be a string or a list of parts", sample_id=sid)
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                for piece in split_markers(part["text"]):
                    if piece["type"] == "image":
                        add_image(parts, None)
                    else:
                        parts.append(piece)
            elif kind == "image_url":
                add_image(parts, _image_url(part, sid))
            elif kind == "image":
                add_image(
                    parts,
                    next((part[k] for k in ("image", "url", "path") if isinstance(part.get(k), str)), None),
                )
            else:
                raise SampleError("bad_schema", f"unsupported content part {part!r:.80}", sample_id=sid)
        messages.append(Message(role, parts))
    if n_listed != len(listed):
        raise SampleError(
            "image_count_mismatch", f"{n_listed} image parts refer to {len(listed)} 'images'", sample_id=sid
        )
    return _finish(sid, messages, images, _meta(record, ("id", "messages", "images")))


# ----------------------------------------------------------------------------------------------- entry points
def detect_format(record: Any) -> str:
    """'llava' | 'captions' | 'messages' | 'qwen' from a record's keys (raises SampleError('bad_schema'))."""
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            return "messages"
        convs = record.get("conversations")
        if isinstance(convs, list):
            has_img_tag = any(
                isinstance(t, dict) and isinstance(t.get("value"), str) and _QWEN_IMG.search(t["value"])
                for t in convs
            )
            return "qwen" if has_img_tag and "image" not in record and "images" not in record else "llava"
        if "caption" in record and "image" in record:
            return "captions"
    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
    raise SampleError(
        "bad_schema",
        f"unrecognised record ({keys}); expected one of: {', '.join(FORMATS.names())}",
    )


def parse_record(
    record: dict[str, Any],
    fmt: str = "auto",
    *,
    index: int = 0,
    caption_instructions: Sequence[str] = DEFAULT_CAPTION_INSTRUCTIONS,
    seed: int = 0,
) -> Sample:
    """One record in `fmt` (or detected, `auto`) -> `Sample`; its id is the record's `id`, else `str(index)`.

    Raises `SampleError` with reason bad_schema | no_assistant_turn | image_count_mismatch.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format '{fmt}'; known: auto, {', '.join(FORMATS.names())}")
    if not isinstance(record, dict):
        raise SampleError(
            "bad_schema", f"a record must be a JSON object, not {type(record).__name__}", sample_id=str(index)
        )
    sid = _record_id(record, index)
    try:
        name = detect_format(record) if fmt == "auto" else fmt
    except SampleError as err:
        raise SampleError(err.reason, str(err), sample_id=sid) from None
    return FORMATS.get(name)(record, sid, index, caption_instructions, seed)
