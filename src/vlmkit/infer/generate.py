"""Batched chat generation over a VisionLanguageModel: messages + images in, texts + boxes out."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmkit.data.collate import Collator
from vlmkit.data.formats import Message
from vlmkit.data.grounding import Box
from vlmkit.data.processor import Layout
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel, truncate_at_stop
from vlmkit.precision import autocast_context, cpu_bf16_supported

DTYPES = ("auto", "bf16", "fp32")


@dataclass
class ChatRequest:
    """One conversation to continue: messages (image parts in order) and the PIL images they refer to."""

    messages: list[Message | dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    config: GenerationConfig | None = None
    box_image: int = 0  # which image the answer's boxes are mapped onto (-1: the last one)
    image_keys: list[str] | None = (
        None  # one per image (sha256 of its bytes): the server's image-feature cache
    )


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" (`should_stop` said so)
    boxes: list[tuple[str | None, Box]]  # parsed from `text`, in pixels of the ORIGINAL image (`box_image`)


def serving_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The weights' dtype for inference: `bf16`, `fp32`, or `auto` = bf16 where the hardware computes in it
    natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16 support), else fp32 (docs/serving.md: measured)."""
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.startswith("cuda"):
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            native = cpu_bf16_supported()
        name = "bf16" if native else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def sampling_key(config: GenerationConfig) -> tuple[Any, ...]:
    """Requests whose configs share this key can share one batch; `max_new_tokens` and `stop_strings` are
    per row. All greedy configs share a key whatever their temperature / top-p / top-k / seed."""
    common = (tuple(config.eos_token_ids), config.use_cache)
    if not config.do_sample or config.temperature <= 0:
        return ("greedy", *common)
    return ("sample", config.temperature, config.top_p, config.top_k, config.seed, *common)


class TextStream:
    """One row's incremental detokenisation (decode-diff): push token ids, get the newly final text.

    Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a stop string,
    so the pieces returned by `push` and `finish` concatenate to exactly the final text.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: Sequence[int],
        stop_strings: Sequence[str],
        max_new_tokens: int,
        *,
        incremental: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.stops = [s for s in stop_strings if s]
        self.max_new_tokens = max_new_tokens
        self.incremental = incremental or bool(self.stops)  # stop strings need the text at every step
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # set once the row is done
        self.emitted = ""
        self._text: str | None = None  # the final text, once done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """Feed the row's next token; returns the text that became final (often "")."""
        if self.done:
            return ""
        if token in self.eos:
            return self._end("stop")
        self.tokens.append(token)
        if not self.incremental:
            return self._end("length") if len(self.tokens) >= self.max_new_tokens else ""
        text = self._decode()
        cut = truncate_at_stop(text, self.stops)
        if len(cut) < len(text):
            return self._end("stop", cut)
        if len(self.tokens) >= self.max_new_tokens:
            return self._end("length", text)
        safe = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
        for stop in self.stops:  # hold back a suffix that may grow into a stop string
            for n in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - n : safe] == stop[:n]:
                    safe -= n
                    break
        return self._emit(text[:safe])

    def cancel(self) -> None:
        if not self.done:
            self._end("cancelled")

    def finish(self) -> str:
        """End the row (budget exhausted if not already done); returns the text not yet emitted."""
        return self._end("length") if not self.done else ""

    @property
    def text(self) -> str:
        """The final text (EOS dropped, cut before any stop string)."""
        if self._text is None:
            return truncate_at_stop(self._decode(), self.stops)
        return self._text

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _end(self, reason: str, text: str | None = None) -> str:
        self.finish_reason = reason
        self._text = truncate_at_stop(self._decode(), self.stops) if text is None else text
        return self._emit(self._text)

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""  # nothing new (or the tokenizer rewrote earlier text: leave it to the final result)
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


class _AllRowsDone(Exception):
    """Raised from the step callback to end decoding once every row is done by its own settings."""


class Predictor:
    """Prepares conversations with the model's `Processor` (chat template, images, placeholders), pads them in the
    collator (left) and decodes in batches."""

    def __init__(
        self,
        model: VisionLanguageModel,
        *,
        template: str | None = None,
        resize: str | None = None,
        system_prompt: str | None = None,
        grounding_format: str | None = None,
        precision: str = "fp32",
    ) -> None:
        """Settings default to the model's saved `processor` config (what it was trained with); the arguments
        override them for this predictor. `precision` `auto` decodes under bf16 autocast where the hardware
        supports it (about 2x faster on such CPUs)."""
        self.precision = precision
        self.model = model.eval()
        changes = {
            "template": template,
            "resize": resize,
            "system_prompt": system_prompt,
            "grounding_format": grounding_format,
        }
        self.processor = model.processor.replace(**{k: v for k, v in changes.items() if v is not None})
        self.collate = Collator(model.tokenizer.pad_token_id, "left")

    @property
    def template(self) -> str:
        return self.processor.cfg.template

    @property
    def resize(self) -> str:
        return self.processor.cfg.resize

    @property
    def system_prompt(self) -> str | None:
        return self.processor.cfg.system_prompt

    @property
    def grounding_format(self) -> str | None:
        return self.processor.cfg.grounding_format  # None: any format the parser knows

    def prompt_text(
        self, messages: Sequence[Message | dict[str, Any]], num_tiles: Sequence[int] | None = None
    ) -> str:
        """The exact text fed to the tokenizer (placeholders expanded) for a conversation."""
        return self.processor.render(messages, num_tiles)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Layout]:
        """PIL -> model pixels [tiles, 3, S, S] and the map from original pixels to the model's (global) view."""
        return self.processor.pixels(image)

    def prepare(self, requests: Sequence[ChatRequest]) -> tuple[dict[str, Any], list[list[Layout]]]:
        """Requests -> a left-padded batch (input_ids, attention_mask, pixel_values, image_counts) and each
        request's image layouts."""
        inputs = [self.processor.encode_chat(req.messages, req.images) for req in requests]
        batch = self.collate([x.item() for x in inputs])
        keep = ("input_ids", "attention_mask", "pixel_values", "image_counts", "image_sizes")
        return {k: batch[k] for k in keep if k in batch}, [x.layouts for x in inputs]

    def num_tiles(self, image: Image.Image) -> int:
        """How many tower inputs (hence placeholder runs) an image becomes: 1, or its AnyRes tiles."""
        return self.processor.images.num_tiles(image.size)

    def prompt_length(
        self, messages: Sequence[Message | dict[str, Any]], images: Sequence[Image.Image] = ()
    ) -> int:
        """Prompt tokens of a conversation (image placeholders included, from image sizes alone: no pixels are
        processed); raises on an image-count mismatch."""
        return self.processor.prompt_length(messages, [im.size for im in images])

    def generate(
        self,
        requests: Sequence[ChatRequest],
        config: GenerationConfig | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> list[ChatResult]:
        """Continue every conversation in one batch.

        A request's own `config` wins over `config`. Rows may differ in `max_new_tokens` and `stop_strings`;
        the rest must agree (`sampling_key`). `streamer(next_tokens[B])` sees raw tokens each step;
        `on_text(row, delta)` gets each row's text as it becomes final (decode-diff); `should_stop(row)`,
        polled every step, ends a row early (finish_reason "cancelled").
        """
        if not requests:
            return []
        configs = [req.config or config or GenerationConfig() for req in requests]
        if len({sampling_key(c) for c in configs}) > 1:
            raise ValueError("requests in one batch must share sampling settings (see sampling_key)")
        batch_config = dataclasses.replace(
            configs[0], max_new_tokens=max(c.max_new_tokens for c in configs), stop_strings=[]
        )
        eos = batch_config.eos_token_ids or self.model.llm.eos_token_ids
        rows = [
            TextStream(
                self.model.tokenizer, eos, c.stop_strings, c.max_new_tokens, incremental=on_text is not None
            )
            for c in configs
        ]
        batch, transforms = self.prepare(requests)

        def step(next_tokens: torch.Tensor) -> None:  # next_tokens [B]
            if streamer is not None:
                streamer(next_tokens)
            for i, (row, token) in enumerate(zip(rows, next_tokens.tolist())):
                delta = row.push(token)
                if should_stop is not None and not row.done and should_stop(i):
                    row.cancel()
                if delta and on_text is not None:
                    on_text(i, delta)
            if all(row.done for row in rows):
                raise _AllRowsDone

        if batch_config.max_new_tokens > 0:
            with contextlib.suppress(_AllRowsDone):
                self._decode(batch, batch_config, step)
        results = []
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        for i, (req, row) in enumerate(zip(requests, rows)):
            delta = row.finish()
            if delta and on_text is not None:
                on_text(i, delta)
            results.append(
                ChatResult(
                    row.text,
                    row.tokens,
                    int(prompt_lengths[i]),
                    len(row.tokens),
                    row.finish_reason or "length",
                    self.boxes(row.text, transforms[i], req.box_image),
                )
            )
        return results

    def _decode(
        self, batch: dict[str, Any], config: GenerationConfig, streamer: Callable[[torch.Tensor], None]
    ) -> None:
        """Run the model's decode loop on a prepared batch, feeding every step's tokens [B] to `streamer`."""
        param = next(self.model.parameters())
        batch = {k: v.to(param.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if batch.get("pixel_values") is not None:  # the tower's dtype (bf16 weights take bf16 pixels)
            batch["pixel_values"] = batch["pixel_values"].to(next(self.model.vision.parameters()).dtype)
        device = param.device
        with autocast_context(self.precision, device.type):
            self.model.generate(**batch, config=config, streamer=streamer)

    def boxes(self, text: str, layouts: Sequence[Layout], image: int = 0) -> list[tuple[str | None, Box]]:
        """Boxes in `text` (coordinates relative to the model input) mapped onto original image `image`."""
        if not layouts:
            return []
        layout = layouts[image] if -len(layouts) <= image < len(layouts) else layouts[0]
        return self.processor.boxes_to_original(text, layout)

    def chat(
        self,
        messages: Sequence[Message | dict[str, Any]],
        images: Sequence[Image.Image] = (),
        **overrides: Any,
    ) -> ChatResult:
        """One conversation, generation settings as keyword overrides (max_new_tokens, temperature, ...)."""
        config = dataclasses.replace(GenerationConfig(), **overrides)
        return self.generate([ChatRequest(list(messages), list(images))], config)[0]
