"""Chat templates, image placeholder expansion, assistant-only labels from role spans, turn truncation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import IMAGE_MARKER, Message, Sample, SampleError, split_markers
from vlmkit.log import get_logger
from vlmkit.templates import BUILTIN_TEMPLATES, resolve_template

log = get_logger(__name__)

TokensPerImage = int | Callable[[int], int]


@dataclass
class EncodedSample:
    """Token ids with placeholders expanded; labels `IGNORE_INDEX` except assistant tokens + end-of-turn."""

    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[str]  # refs of the images kept after truncation, in order
    num_tiles: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each kept image


# ------------------------------------------------------------------------------------------------ templates
def _content_text(message: Message, image_token: str) -> str:
    """A message as one string: each image part is `image_token`; a newline separates an image from text that
    follows it directly (LLaVA's `<image>\\n` convention)."""
    out = []
    parts = message.content
    for k, part in enumerate(parts):
        if part["type"] == "image":
            out.append(image_token)
            nxt = parts[k + 1] if k + 1 < len(parts) else None
            if nxt is not None and nxt["type"] == "text" and not nxt["text"][:1].isspace():
                out.append("\n")
        else:
            out.append(part["text"])
    return "".join(out)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself (Llama-style); built-in templates then
    write it, since chat text is tokenized without special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


class _Renderer:
    """Renders string-content conversations with one template (and the variables the built-ins need)."""

    def __init__(self, tokenizer: Any, template: str, image_token: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.kwargs: dict[str, Any] = {"image_token": image_token}
        if template in BUILTIN_TEMPLATES.values():
            self.kwargs["bos_token"] = tokenizer.bos_token if _adds_bos(tokenizer) else ""

    def __call__(self, conv: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            conv,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.kwargs,
        )


def _with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """`system_prompt` as a leading system turn when the conversation has none (it replaces the template's
    default system prompt, e.g. SmolLM2's)."""
    messages = list(messages)
    if system_prompt is not None and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", [{"type": "text", "text": system_prompt}]))
    return messages


def _tokens_for(tokens_per_image: TokensPerImage, tiles: int) -> int:
    """Placeholder tokens for one image: a callable gets its tile count; an int is a fixed count per image."""
    n = tokens_per_image(tiles) if callable(tokens_per_image) else tokens_per_image
    if int(n) < 1:
        raise ValueError(f"tokens_per_image gave {n} for {tiles} tile(s); it must be >= 1")
    return int(n)


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"the image token {image_token!r} is {len(ids)} tokens; add it as a special token "
            "(tokenizer.add_special_tokens({'additional_special_tokens': [...]}))"
        )
    return ids[0]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    return ids


# ------------------------------------------------------------------------------------------------ inference
def _as_message(message: Message | dict[str, Any]) -> Message:
    """A `Message`, or a dict {role, content: str with `<image>` markers | [text/image/image_url parts]}."""
    if isinstance(message, Message):
        return message
    content = message.get("content", "")
    if isinstance(content, str):
        return Message(message["role"], split_markers(content))
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") == "text":
            parts += split_markers(part["text"])
        elif part.get("type") in ("image", "image_url"):
            parts.append({"type": "image"})
        else:
            raise ValueError(f"unsupported content part {part!r:.80}")
    return Message(message["role"], parts)


def render_prompt(
    messages: Sequence[Message | dict[str, Any]],
    tokenizer: Any,
    *,
    template: str = "auto",
    add_generation_prompt: bool = True,
    image_token: str = IMAGE_MARKER,
    tokens_per_image: TokensPerImage = 1,
    system_prompt: str | None = None,
    num_tiles: Sequence[int] | None = None,
    image_tokens: Sequence[int] | None = None,
) -> str:
    """The text to tokenize for inference: the chat rendered with each image's placeholder run expanded
    (`image_tokens`: each image's placeholder count, overriding `tokens_per_image` of its tile count)."""
    msgs = _with_system([_as_message(m) for m in messages], system_prompt)
    render = _Renderer(tokenizer, resolve_template(tokenizer, template), image_token)
    text = render(
        [{"role": m.role, "content": _content_text(m, image_token)} for m in msgs], add_generation_prompt
    )
    n_images = sum(m.num_images for m in msgs)
    tiles = list(num_tiles) if num_tiles is not None else [1] * n_images
    pieces = text.split(image_token)
    if len(pieces) - 1 != n_images or len(tiles) != n_images:
        raise SampleError(
            "image_count_mismatch",
            f"rendered prompt has {len(pieces) - 1} '{image_token}', expected {n_images} "
            f"({len(tiles)} tile counts)",
        )
    counts = _per_image(tokens_per_image, tiles, image_tokens)
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(image_token * count + piece)
    return "".join(out)


def _per_image(
    tokens_per_image: TokensPerImage, tiles: Sequence[int], image_tokens: Sequence[int] | None
) -> list[int]:
    """Placeholder tokens of each image: `image_tokens` when given, else `tokens_per_image` of its tiles."""
    if image_tokens is None:
        return [_tokens_for(tokens_per_image, t) for t in tiles]
    if len(image_tokens) != len(tiles) or any(int(n) < 1 for n in image_tokens):
        raise ValueError(
            f"image_tokens {list(image_tokens)} must give a count >= 1 for each of {len(tiles)} images"
        )
    return [int(n) for n in image_tokens]


# ------------------------------------------------------------------------------------------------ training
def _round_ends(messages: Sequence[Message]) -> list[int]:
    """Message index after each (user..., assistant...) round: a round ends where a user turn follows an
    assistant turn, and at the end."""
    ends = [
        i
        for i in range(1, len(messages))
        if messages[i].role == "user" and messages[i - 1].role == "assistant"
    ]
    return ends + [len(messages)]


def _assistant_spans(conv: list[dict[str, str]], full: str, render: _Renderer) -> list[tuple[int, int, int]]:
    """(content start, content end, turn end) char positions in `full` for each assistant turn with text.

    Turn boundaries come from rendering the conversation prefix up to each assistant turn (with the generation
    prompt, so the role header is excluded) and through it; the template must render prefixes stably.
    """
    spans = []
    for i, msg in enumerate(conv):
        if msg["role"] != "assistant" or not msg["content"].strip():
            continue
        head = render(conv[:i], add_generation_prompt=True)
        if not full.startswith(head):
            head = render(conv[:i], add_generation_prompt=False)
        through = full if i == len(conv) - 1 else render(conv[: i + 1], add_generation_prompt=False)
        if not (full.startswith(head) and full.startswith(through)):
            raise ValueError(
                "the chat template does not render conversation prefixes as prefixes; cannot label"
            )
        start, end = len(head), len(through)
        content = msg["content"]
        pos = full.find(content, start, end)
        if pos < 0:  # the template trimmed or rewrote it
            content = content.strip()
            pos = full.find(content, start, end)
        if pos < 0:
            log.debug("assistant content not found verbatim in the rendered turn; labelling the whole turn")
            spans.append((start, end, end))
        else:
            spans.append((pos, pos + len(content), end))
    return spans


def _label(
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int, int]],
    image_id: int,
    special: set[int],
) -> list[int]:
    """Labels: tokens overlapping an assistant content span, then the turn's tokens up to and including its
    first special (end-of-turn) token; everything else, and image placeholders, `IGNORE_INDEX`."""
    labels = [IGNORE_INDEX] * len(ids)
    for cs, ce, end in spans:
        for j, (a, b) in enumerate(offsets):
            if b <= cs or ids[j] == image_id:
                continue
            if a >= end:
                break
            labels[j] = ids[j]
            if a >= ce and ids[j] in special:
                break
    return labels


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("labelling from role spans needs a fast tokenizer (offset mapping)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_sample(
    sample: Sample,
    tokenizer: Any,
    *,
    image_token: str = IMAGE_MARKER,
    tokens_per_image: TokensPerImage,
    template: str = "auto",
    system_prompt: str | None = None,
    max_length: int | None = 512,
    num_tiles: Sequence[int] | None = None,
    image_tokens: Sequence[int] | None = None,
) -> EncodedSample:
    """Render, tokenize, label and truncate one sample.

    `tokens_per_image`: a fixed count per image, or a callable of the image's tile count (`num_tiles`, one per
    image, default 1); `image_tokens` gives each image's count directly (when it depends on more than tiles). Later (user, assistant) rounds are dropped whole until the sequence fits `max_length`.
    Raises `SampleError` with reason image_count_mismatch | bad_schema | too_long | all_labels_masked.
    """
    sid = sample.id
    tiles = list(num_tiles) if num_tiles is not None else [1] * len(sample.images)
    n_parts = sum(m.num_images for m in sample.messages)
    if not (n_parts == len(sample.images) == len(tiles)):
        raise SampleError(
            "image_count_mismatch",
            f"{n_parts} image parts, {len(sample.images)} images, {len(tiles)} tile counts",
            sample_id=sid,
        )
    messages = _with_system(sample.messages, system_prompt)
    first = next((m for m in messages if m.role != "system"), None)
    if first is None or first.role != "user":
        raise SampleError("bad_schema", "the conversation must start with a user turn", sample_id=sid)
    render = _Renderer(tokenizer, resolve_template(tokenizer, template), image_token)
    image_id = _image_token_id(tokenizer, image_token)
    per_image = _per_image(tokens_per_image, tiles, image_tokens)

    ends = _round_ends(messages)
    for k in range(len(ends), 0, -1):  # keep rounds[:k], dropping whole rounds from the end
        kept = messages[: ends[k - 1]]
        conv = [{"role": m.role, "content": _content_text(m, image_token)} for m in kept]
        full = render(conv, add_generation_prompt=False)
        ids, offsets = _tokenize(tokenizer, full)
        n_img = sum(m.num_images for m in kept)
        found = ids.count(image_id)
        if found != n_img:
            raise SampleError(
                "image_count_mismatch",
                f"{found} '{image_token}' tokens in the rendered text for {n_img} images",
                sample_id=sid,
            )
        length = len(ids) - n_img + sum(per_image[:n_img])
        if max_length is None or length <= max_length:
            break
    else:
        raise SampleError(
            "too_long", f"the first round alone is {length} tokens > max_length={max_length}", sample_id=sid
        )
    if k < len(ends):
        log.debug(
            "%s: dropped %d of %d rounds to fit max_length=%s", sid, len(ends) - k, len(ends), max_length
        )

    labels = _label(ids, offsets, _assistant_spans(conv, full, render), image_id, _special_ids(tokenizer))
    input_ids, out_labels, img = [], [], 0
    for tok, lab in zip(ids, labels):
        if tok == image_id:
            input_ids += [image_id] * per_image[img]
            out_labels += [IGNORE_INDEX] * per_image[img]
            img += 1
        else:
            input_ids.append(tok)
            out_labels.append(lab)
    if input_ids.count(image_id) != sum(per_image[:n_img]):
        raise SampleError("image_count_mismatch", "placeholder expansion miscounted", sample_id=sid)
    if all(lab == IGNORE_INDEX for lab in out_labels):
        raise SampleError("all_labels_masked", "no assistant token carries loss", sample_id=sid)
    return EncodedSample(
        sid, input_ids, out_labels, list(sample.images[:n_img]), tiles[:n_img], dict(sample.meta)
    )
