"""Referring expression grounding (RefCOCO): predicted boxes scored by Acc@IoU0.5."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.data.grounding import Box, parse_boxes
from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks.base import (
    Benchmark,
    EvalItem,
    Prediction,
    _first,
    _require,
    read_rows,
    register,
)
from vlmkit.infer.generate import ChatResult


# -------------------------------------------------------------------------------------------------- grounding
@register("grounding", "refcoco")
class Grounding(Benchmark):
    """RefCOCO-style JSONL: `question_id, image, text, bbox` (COCO xywh pixels), `width, height`; Acc@0.5.

    A prediction's `box` (original pixels, written when this toolkit ran the model) is used as is; otherwise
    it is parsed from the answer text in `grounding_format` (any format when None) against the image size.
    """

    max_new_tokens = 48

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        prompt_template: str = "Give the bounding box of {text}.",
        grounding_format: str | None = None,
        threshold: float = 0.5,
    ):
        super().__init__(data, images)
        self.prompt_format = prompt_template
        self.grounding_format = grounding_format
        self.threshold = threshold

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "grounding_format": self.grounding_format,
            "iou_threshold": self.threshold,
        }

    def load(self) -> list[EvalItem]:
        items = []
        where = str(self.data)
        for row in read_rows(self.data):
            qid = _require(row, "question_id", "id", where=where)
            text = str(_require(row, "text", "sent", "expression", "referring_expression", where=where))
            x, y, w, h = (float(v) for v in _require(row, "bbox", where=where))
            meta = {"width": _first(row, "width"), "height": _first(row, "height"), "text": text}
            image = str(_require(row, "image", "file_name", where=where))
            items.append(
                EvalItem(qid, self.prompt_format.format(text=text), [image], Box.from_xywh(x, y, w, h), meta)
            )
        return items

    def prediction(self, item: EvalItem, result: ChatResult) -> Prediction:
        box = list(result.boxes[0][1].to_xyxy()) if result.boxes else None
        return {"question_id": item.question_id, "answer": result.text, "box": box}

    def predicted_box(self, item: EvalItem, prediction: Prediction) -> Box | None:
        if "box" in prediction:
            return Box(*prediction["box"]) if prediction["box"] else None
        width, height = item.meta.get("width"), item.meta.get("height")
        if not width or not height:
            with Image.open(self.image_root / item.images[0]) as im:
                width, height = im.size
        found = parse_boxes(
            str(prediction.get("answer") or ""), self.grounding_format, int(width), int(height)
        )
        return found[0][1] if found else None

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        boxes = [
            self.predicted_box(it, predictions[it.key]) if it.key in predictions else None for it in items
        ]
        gold = [it.target for it in items]
        return {
            "acc50": M.box_accuracy(boxes, gold, self.threshold),
            "mean_iou": M.mean(b.iou(g) if b is not None else 0.0 for b, g in zip(boxes, gold)),
            "no_box": M.mean(float(b is None) for b in boxes),
            "n": len(items),
        }
