"""VQAv2: open answers scored with the official accuracy (normalised, against ten annotators)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    EvalItem,
    Prediction,
    _first,
    _require,
    _with_suffix,
    answer_text,
    read_rows,
    register,
)


# ------------------------------------------------------------------------------------------------------ VQAv2
@register("vqav2")
class VQAv2(Benchmark):
    """Official VQAv2 questions JSON (or a JSONL of `question_id, image, question/text`) as `data`; the
    official annotations JSON as `annotations` (without it only predictions are made)."""

    max_new_tokens = 16

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        annotations: str | Path | None = None,
        prompt_suffix: str = SHORT_ANSWER,
    ):
        super().__init__(data, images)
        self.annotations = Path(annotations) if annotations else None
        self.prompt_suffix = prompt_suffix
        self.prompt_format = "{question}" + (f"\n{prompt_suffix}" if prompt_suffix else "")

    def data_files(self) -> list[Path]:
        return [self.data] + ([self.annotations] if self.annotations else [])

    def load(self) -> list[EvalItem]:
        subtype = None
        if self.data.suffix.lower() == ".json":
            head = json.loads(self.data.read_text(encoding="utf-8"))
            subtype = head.get("data_subtype") if isinstance(head, dict) else None
        answers = self._answers()
        items = []
        for row in read_rows(self.data):
            qid = _require(row, "question_id", where=str(self.data))
            image = _first(row, "image", "image_path")
            if image is None:
                image_id = int(_require(row, "image_id", where=str(self.data)))
                image = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else f"{image_id:012d}.jpg"
            question = _require(row, "question", "text", where=str(self.data))
            gold = answers.get(str(qid))
            meta = {"answer_type": gold[1]} if gold else {}
            items.append(
                EvalItem(
                    qid,
                    _with_suffix(question, self.prompt_suffix),
                    [str(image)],
                    gold[0] if gold else None,
                    meta,
                )
            )
        return items

    def _answers(self) -> dict[str, tuple[list[str], str]]:
        if self.annotations is None:
            return {}
        out = {}
        for ann in read_rows(self.annotations):
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in ann["answers"]]
            out[str(ann["question_id"])] = (answers, str(ann.get("answer_type", "all")))
        return out

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        scored = [it for it in items if it.target]
        if not scored:
            self.info["note"] = "no annotations: predictions only"
            return {"n": 0}
        accs = {it.key: M.vqa_accuracy(answer_text(predictions, it), it.target) for it in scored}
        out = {"accuracy": M.mean(accs.values()), "n": len(scored)}
        by_type: dict[str, list[float]] = defaultdict(list)
        for it in scored:
            by_type[it.meta["answer_type"]].append(accs[it.key])
        for kind in sorted(by_type):
            out[f"accuracy_{re.sub(r'[^0-9a-zA-Z]+', '_', kind)}"] = M.mean(by_type[kind])
        return out
