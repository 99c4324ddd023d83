"""Conversation data formats (LLaVA, caption pairs, OpenAI messages, Qwen-VL `<img>` text) -> one `Sample`."""

from __future__ import annotations

import codecs
import json
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.config import DataConfig
from vlmkit.constants import IMAGE_MARKER
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
BAD_ENCODING = "bad_encoding"  # a record with bytes that are not UTF-8
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8 (decoded with surrogateescape)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_NEITHER = "the file is neither one JSON document nor JSON lines"


class DataError(ValueError):
    """Data that cannot be used as given (a file that is neither JSON nor JSONL, a filter that keeps nothing);
    the message names the file, its line or the setting."""


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is a short machine-readable key, `sample_id` names it."""

    def __init__(self, reason: str, message: str = "", *, sample_id: str | None = None) -> None:
        self.reason = reason
        self.sample_id = sample_id
        where = f" [{sample_id}]" if sample_id is not None else ""
        super().__init__(f"{reason}{where}: {message}" if message else f"{reason}{where}")


@dataclass
class Message:
    """One turn. `content` parts, in order: {"type": "text", "text": str} | {"type": "image"} (the i-th image
    part of a sample is `Sample.images[i]`)."""

    role: str
    content: list[dict[str, Any]]

    @property
    def text(self) -> str:
        """The turn's text parts joined (images left out)."""
        return "".join(p["text"] for p in self.content if p["type"] == "text")

    @property
    def num_images(self) -> int:
        return sum(1 for p in self.content if p["type"] == "image")


@dataclass
class Sample:
    """A conversation with its image references, whatever file format it came from."""

    id: str
    messages: list[Message]
    images: list[str]  # refs in order of appearance: relative/absolute paths, data: or http(s) URLs
    meta: dict[str, Any] = field(default_factory=dict)  # every other key of the record (task, answer, ...)


ParseFn = Callable[[dict[str, Any], str, int, Sequence[str], int], Sample]
FORMATS: Registry[ParseFn] = Registry("data format")


# ------------------------------------------------------------------------------------------------ helpers
def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image() -> dict[str, Any]:
    return {"type": "image"}


def split_markers(text: str, marker: str = IMAGE_MARKER) -> list[dict[str, Any]]:
    """'a<image>b' -> [text 'a', image, text 'b'] (empty text parts dropped)."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(text.split(marker)):
        if i:
            parts.append(_image())
        if chunk:
            parts.append(_text(chunk))
    return parts


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
            first_user.content[:0] = [_image() for _ in images]
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
                parts.append(_image())
            elif chunk:
                parts.append(_text(chunk))
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
    user: list[dict[str, Any]] = [_image() for _ in images]
    instruction = _instruction(instructions, seed, index)
    if instruction:
        user.append(_text(instruction))
    messages = [Message("user", user), Message("assistant", [_text(caption)])]
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
        parts.append(_image())

    messages = []
    for msg in raw:
        if not isinstance(msg, dict):
            raise SampleError("bad_schema", "each message must be an object", sample_id=sid)
        role = _role(msg.get("role"), sid)
        content = msg.get("content")
        if isinstance(content, str):
            content = [_text(content)]
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


def select_tasks(samples: Sequence[Sample], tasks: Sequence[str], source: str | Path = "") -> list[Sample]:
    """The samples whose record's `task` is one of `tasks` (a stage's `tasks:` filter), in order.

    A filter that keeps none of a non-empty list raises `DataError` naming the filter and the tasks found.
    """
    wanted = set(tasks)
    kept = [smp for smp in samples if smp.meta.get("task") in wanted]
    if samples and not kept:
        found = Counter(str(smp.meta["task"]) for smp in samples if "task" in smp.meta)
        held = [f"{n} '{task}'" for task, n in found.most_common(10)]
        untagged = sum("task" not in smp.meta for smp in samples)
        if untagged:
            held.append(f"{untagged} records have no `task` field")
        raise DataError(
            f"{source}: the stage's `tasks: [{', '.join(tasks)}]` filter keeps none of its {len(samples)} "
            f"samples ({'; '.join(held)}); remove the stage's `tasks` (--set stages.N.tasks=[]) or give the "
            "records a matching `task` field"
        )
    return kept


def merge_image_turns(samples: Sequence[Sample], seed: int = 0) -> list[Sample]:
    """Join the single-image samples that share one image into one multi-turn conversation per image.

    LLaVA-1.5 does this with VQA data: the image's tokens (and the template's preamble) are paid once for all
    of its questions instead of once per question. The turn order inside a conversation is shuffled with a
    stable per-image seed, so every kind of question is sometimes the first one (the turn an evaluation asks).
    The image stays in the first user turn; system turns after the first sample's are dropped. Samples with
    no image or several images pass through unchanged. The merged sample keeps the first sample's id and
    meta, plus `merged_ids` and `tasks` (each part's `task`, where it had one); images keep their first
    appearance order.
    """
    groups: dict[str, list[Sample]] = {}
    order: list[str | Sample] = []
    for smp in samples:
        if len(smp.images) != 1:
            order.append(smp)
            continue
        if smp.images[0] not in groups:
            groups[smp.images[0]] = []
            order.append(smp.images[0])
        groups[smp.images[0]].append(smp)
    merged: list[Sample] = []
    for item in order:
        if isinstance(item, Sample):
            merged.append(item)
            continue
        group = groups[item]
        if len(group) == 1:
            merged.append(group[0])
            continue
        rng = random.Random(zlib.crc32(f"{seed}:{item}".encode()))
        group = rng.sample(group, len(group))
        messages = list(group[0].messages)
        for smp in group[1:]:
            for msg in smp.messages:
                if msg.role == "system":
                    continue
                parts = [p for p in msg.content if p["type"] != "image"]
                if msg.role == "user":  # the marker's newline goes with the image
                    parts = [
                        dict(p, text=p["text"].lstrip("\n")) if p["type"] == "text" else p for p in parts
                    ]
                messages.append(Message(msg.role, parts))
        meta = dict(group[0].meta)
        meta["merged_ids"] = [smp.id for smp in group]
        meta["tasks"] = [smp.meta["task"] for smp in group if "task" in smp.meta]
        merged.append(Sample(group[0].id, messages, list(group[0].images), meta))
    return merged


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """(index, record) for a JSON file holding one array (or one object), or for JSONL (index = line number - 1).

    UTF-8 (with or without a BOM), UTF-16 and UTF-32 (by their BOM, or by the NUL bytes of JSON text without
    one) are read. A record that cannot be used yields (index, exception) instead of stopping the pass: a JSONL
    line that is not valid JSON (a `json.JSONDecodeError`), a record that is not an object, a record holding
    bytes that are not UTF-8 (`SampleError` reason `bad_encoding`, sample id `line N`). A file that is neither
    one JSON document nor JSON lines (text after the array, a syntax error inside it, no JSON line at all)
    raises `DataError` naming the first bad line.
    """
    path = Path(path)
    text = _decode(path.read_bytes(), path)
    start = _JSON_SPACE.match(text).end()
    head = text[start : start + 1]
    if head == "[":
        yield from _array_records(text, start + 1, path)
        return
    if head == "{":
        try:
            record, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            record, end = None, start
        if record is not None and _JSON_SPACE.match(text, end).end() == len(text):  # one object: one record
            yield 0, _checked(record, text, start, end)
            return
    yield from _jsonl_records(text, path)


def _decode(data: bytes, path: Path) -> str:
    """The text of a data file: UTF-16 / UTF-32 by BOM or by NUL bytes (strictly), else UTF-8 with any bad bytes
    kept as lone surrogates (`_UNDECODABLE`), so that only the records holding them are rejected."""
    boms = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"))
    boms += ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    codec = next((name for bom, name in boms if data.startswith(bom)), None)
    if codec is None and b"\x00" in data[:4]:  # JSON text starts with ASCII: NULs mean UTF-16/32 without BOM
        if data[1:4] == b"\x00\x00\x00":
            codec = "utf-32-le"
        elif data[:3] == b"\x00\x00\x00":
            codec = "utf-32-be"
        else:
            codec = "utf-16-le" if data[1:2] == b"\x00" else "utf-16-be"
    if codec is None:
        return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    try:
        return data.decode(codec).removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].decode(codec, errors="replace").count("\n") + 1
        raise DataError(
            f"{path}:{line}: read as {codec.upper()} (its BOM or NUL bytes say so), but byte {err.start} is not "
            f"{codec.upper()} ({err.reason}); save the file as UTF-8"
        ) from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _checked(record: Any, text: str, start: int, end: int) -> dict[str, Any] | Exception:
    """`record` (parsed from text[start:end]), or the error that rejects it: bytes that were not UTF-8, or not
    an object."""
    bad = _UNDECODABLE.search(text, start, end)
    if bad is not None:
        byte = ord(bad.group()) - 0xDC00
        return SampleError(
            BAD_ENCODING,
            f"byte 0x{byte:02x} is not UTF-8 (the file mixes encodings); this record is skipped: re-encode the "
            "file as UTF-8 to keep it",
            sample_id=f"line {_line_of(text, bad.start())}",
        )
    if not isinstance(record, dict):
        return SampleError(
            "bad_schema", "a record must be a JSON object", sample_id=f"line {_line_of(text, start)}"
        )
    return record


def _array_records(text: str, pos: int, path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """The elements of the JSON array opened just before `pos`, one at a time (each checked by `_checked`)."""
    decoder = json.JSONDecoder()
    index = 0
    pos = _JSON_SPACE.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{err.lineno}: not valid JSON in record {index + 1} of the array ({err.msg}, column "
                    f"{err.colno}); {_NEITHER}"
                ) from None
            yield index, _checked(record, text, pos, end)
            index += 1
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise DataError(
                f"{path}:{_line_of(text, pos)}: expected ',' or ']' after record {index} of the array, found "
                f"{text[pos : pos + 20]!r}; {_NEITHER}"
            )
    rest = _JSON_SPACE.match(text, pos).end()
    if rest < len(text):
        raise DataError(
            f"{path}:{_line_of(text, rest)}: text after the JSON array that ends on line {_line_of(text, pos)} "
            f"({text[rest : rest + 30]!r}); {_NEITHER}"
        )


def _jsonl_records(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """One record per non-empty line; a file none of whose lines is JSON raises `DataError`."""
    parsed, first_error = 0, None
    offset = 0
    for i, line in enumerate(text.split("\n")):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        if _UNDECODABLE.search(line):
            yield i, _checked(None, text, start, start + len(line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            first_error = first_error or (i, err)
            yield i, err
            continue
        parsed += 1
        yield i, record if isinstance(record, dict) else _not_object(i)
    if not parsed and first_error is not None:
        i, err = first_error
        raise DataError(f"{path}:{i + 1}: not valid JSON ({err.msg}, column {err.colno}); {_NEITHER}")


def _not_object(index: int) -> SampleError:
    return SampleError("bad_schema", "a record must be a JSON object", sample_id=f"line {index + 1}")


def load_samples(
    path: str | Path,
    fmt: str = "auto",
    *,
    caption_instructions: Sequence[str] = DEFAULT_CAPTION_INSTRUCTIONS,
    seed: int = 0,
) -> tuple[list[Sample], Counter[str], dict[str, str]]:
    """All good samples of a file, a Counter of skip reasons, and one example sample id per reason.

    Malformed JSONL lines count as `bad_schema` (example id `line N`); bad records are skipped, never raised.
    """
    samples: list[Sample] = []
    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for index, item in read_records(path):
        try:
            if isinstance(item, SampleError):
                raise item
            if isinstance(item, Exception):
                raise SampleError("bad_schema", f"malformed JSON: {item}", sample_id=f"line {index + 1}")
            samples.append(
                parse_record(item, fmt, index=index, caption_instructions=caption_instructions, seed=seed)
            )
        except SampleError as err:
            skipped[err.reason] += 1
            examples.setdefault(err.reason, err.sample_id if err.sample_id is not None else str(index))
            log.debug("skipping record %d of %s: %s", index, path, err)
    if skipped:
        log.warning(
            "%s: kept %d samples, skipped %d (%s)",
            path,
            len(samples),
            sum(skipped.values()),
            ", ".join(f"{r}={n}" for r, n in skipped.most_common()),
        )
    return samples, skipped, examples
