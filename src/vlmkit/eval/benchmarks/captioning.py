"""Captioning (COCO captions): BLEU / METEOR / ROUGE-L / CIDEr via pycocoevalcap."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks.base import (
    Benchmark,
    EvalItem,
    Prediction,
    answer_text,
    register,
)


# ------------------------------------------------------------------------------------------------- captioning
@register("captioning", "coco-captions")
class Captioning(Benchmark):
    """COCO captions JSON (`images: [{id, file_name}]`, `annotations: [{image_id, caption}]`): BLEU-1..4 and
    CIDEr from pycocoevalcap (PTB tokenizer when java is installed, else a Python one, noted in results).
    Question ids are image ids."""

    max_new_tokens = 32

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        prompt: str = "Provide a one-sentence caption for the provided image.",
        tokenizer: str = "auto",
    ):
        super().__init__(data, images)
        self.prompt_format = prompt
        self.tokenizer = tokenizer

    def load(self) -> list[EvalItem]:
        data = json.loads(self.data.read_text(encoding="utf-8"))
        refs: dict[Any, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            refs[ann["image_id"]].append(str(ann["caption"]))
        return [
            EvalItem(img["id"], self.prompt_format, [img["file_name"]], refs[img["id"]])
            for img in data["images"]
            if refs.get(img["id"])
        ]

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        refs = {it.key: it.target for it in items}
        cands = {it.key: answer_text(predictions, it) for it in items}
        out, used = M.caption_metrics(refs, cands, self.tokenizer)
        self.info["caption_tokenizer"] = used
        if used == "python":
            self.info["note"] = (
                "java not found: a Python tokenizer replaced PTBTokenizer (numbers may differ)"
            )
        return out
