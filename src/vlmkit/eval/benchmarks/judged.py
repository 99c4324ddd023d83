"""Open questions scored by an LLM judge (MM-Vet style)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks.base import (
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
from vlmkit.eval.judge import Judge


# ----------------------------------------------------------------------------------------------- LLM-as-judge
@register("judge", "mmvet")
class JudgedQA(Benchmark):
    """Open-ended QA graded by an LLM judge (MM-Vet style): `question_id, image, question, answer (reference),
    category/capability?` (JSON list, JSONL, or MM-Vet's {id: {imagename, question, answer, capability}})."""

    max_new_tokens = 256

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        judge: Judge | None = None,
        prompt_suffix: str | None = None,
    ):
        super().__init__(data, images)
        self.judge = judge
        self.prompt_suffix = prompt_suffix

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "judge": self.judge.describe() if self.judge else None}

    def load(self) -> list[EvalItem]:
        items = []
        where = str(self.data)
        for row in read_rows(self.data):
            qid = _require(row, "question_id", "id", where=where)
            question = str(_require(row, "question", "text", where=where))
            reference = str(_require(row, "answer", "reference", "gt", where=where))
            image = _first(row, "image", "imagename", "image_path")
            cats = _first(row, "capability", "category", default=[])
            cats = [cats] if isinstance(cats, str) else list(cats)
            meta = {"question": question, "categories": cats}
            items.append(
                EvalItem(
                    qid,
                    _with_suffix(question, self.prompt_suffix),
                    [str(image)] if image else [],
                    reference,
                    meta,
                )
            )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        if self.judge is None:
            self.info["note"] = "no judge: predictions only (score them with --judge-url and --judge-model)"
            return {"n": len(items)}
        scores: list[float] = []
        failed = 0
        by_cat: dict[str, list[float]] = defaultdict(list)
        for it in items:
            verdict = self.judge.judge(it.meta["question"], it.target, answer_text(predictions, it))
            failed += verdict.score is None
            value = verdict.score or 0.0
            scores.append(value)
            for cat in it.meta["categories"]:
                by_cat[cat].append(value)
        out = {"judge_score": M.mean(scores), "judge_failed": failed, "n": len(items)}
        for cat in sorted(by_cat):
            out[f"score_{re.sub(r'[^0-9a-zA-Z]+', '_', cat).strip('_')}"] = M.mean(by_cat[cat])
        return out
