"""Batched chat generation over a VisionLanguageModel: messages + images in, texts + boxes out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmkit.data.formats import Message
from vlmkit.data.grounding import Box, box_to_original, parse_boxes
from vlmkit.data.images import ImageTransform, image_mean_color, resize_image
from vlmkit.data.prompts import render_prompt
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel, truncate_at_stop


@dataclass
class ChatRequest:
    """One conversation to continue: messages (image parts in order) and the PIL images they refer to."""

    messages: list[Message | dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    config: GenerationConfig | None = None


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    boxes: list[tuple[str | None, Box]]  # parsed from `text`, in pixels of the ORIGINAL image (first image)


class Predictor:
    """Renders prompts with the model's chat template, preprocesses images, decodes in batches (left padding)."""

    def __init__(self, model: VisionLanguageModel, *, template: str = "auto", resize: str = "resize",
                 system_prompt: str | None = None, grounding_format: str | None = None) -> None:
        self.model = model.eval()
        self.template = template
        self.resize = resize
        self.system_prompt = system_prompt
        self.grounding_format = grounding_format  # None: any format the parser recognises

    def prompt_text(self, messages: Sequence[Message | dict[str, Any]]) -> str:
        """The exact text fed to the tokenizer (placeholders expanded) for a conversation."""
        return render_prompt(messages, self.model.tokenizer, template=self.template, add_generation_prompt=True,
                             image_token=self.model.llm.image_token,
                             tokens_per_image=self.model.tokens_per_image, system_prompt=self.system_prompt)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, ImageTransform]:
        """PIL -> model pixels [3,S,S] and the transform mapping original pixels to model-input pixels."""
        vision = self.model.vision
        fill = image_mean_color(vision.image_mean)
        resized, transform = resize_image(image.convert("RGB"), vision.image_size, self.resize, fill=fill)
        return vision.transform(resized), transform

    def prepare(self, requests: Sequence[ChatRequest]) -> tuple[dict[str, Any], list[list[ImageTransform]]]:
        texts, pixels, counts, transforms = [], [], [], []
        for req in requests:
            texts.append(self.prompt_text(req.messages))
            row = [self.preprocess(img) for img in req.images]
            pixels += [p for p, _ in row]
            transforms.append([t for _, t in row])
            counts.append(len(row))
        tok = self.model.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "pixel_values": torch.stack(pixels) if pixels else None, "image_counts": counts}
        return batch, transforms

    def generate(self, requests: Sequence[ChatRequest], config: GenerationConfig | None = None,
                 streamer: Callable[[torch.Tensor], None] | None = None) -> list[ChatResult]:
        """Continue every conversation in one batch (they share `config`; a request's own config wins if set)."""
        if not requests:
            return []
        config = requests[0].config or config or GenerationConfig()
        batch, transforms = self.prepare(requests)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        new = self.model.generate(**batch, config=config, streamer=streamer).cpu()
        eos = set(config.eos_token_ids or self.model.llm.eos_token_ids)
        pad = self.model.tokenizer.pad_token_id
        results = []
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, tokens in enumerate(new.tolist()):
            kept, reason = [], "length"
            for t in tokens:
                if t in eos:
                    reason = "stop"
                    break
                kept.append(t)
            if reason == "length" and pad not in eos:
                while kept and kept[-1] == pad and len(kept) < len(tokens):
                    kept.pop()
            raw = self.model.tokenizer.decode(kept, skip_special_tokens=True)
            text = truncate_at_stop(raw, config.stop_strings)
            if text != raw:
                reason = "stop"
            results.append(ChatResult(text, kept, int(prompt_lengths[row]), len(kept), reason,
                                      self.boxes(text, transforms[row])))
        return results

    def boxes(self, text: str, transforms: Sequence[ImageTransform]) -> list[tuple[str | None, Box]]:
        """Boxes in `text` (coordinates relative to the model input) mapped onto the first original image."""
        if not transforms:
            return []
        size = self.model.vision.image_size
        found = parse_boxes(text, self.grounding_format, size, size)
        return [(ref, box_to_original(box, transforms[0])) for ref, box in found]

    def chat(self, messages: Sequence[Message | dict[str, Any]], images: Sequence[Image.Image] = (),
             **overrides: Any) -> ChatResult:
        """One conversation, generation settings as keyword overrides (max_new_tokens, temperature, ...)."""
        config = dataclasses.replace(GenerationConfig(), **overrides)
        return self.generate([ChatRequest(list(messages), list(images))], config)[0]
