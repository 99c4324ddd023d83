"""POPE: yes/no object hallucination, scored by the official answer rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks.base import (
    POPE_SPLITS,
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


# ------------------------------------------------------------------------------------------------------- POPE
@register("pope")
class Pope(Benchmark):
    """POPE JSONL (`question_id, image, text, label`); the split is `category`/`split` or from the file name.

    `data` may be a directory of split files (coco_pope_random.json, ...): ids then become `<split>/<id>`.
    Answers are read by the official rule (`pope_yes_no`); `lenient` (recorded in the results) lowercases first.
    """

    prompt_format = "{text}\n" + SHORT_ANSWER

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        prompt_suffix: str = SHORT_ANSWER,
        lenient: bool = False,
    ):
        super().__init__(data, images)
        self.prompt_suffix = prompt_suffix
        self.prompt_format = "{text}" + (f"\n{prompt_suffix}" if prompt_suffix else "")
        self.lenient = lenient
        self.info["answer_rule"] = (
            "lenient (lowercased, punctuation split): not comparable with published POPE numbers"
            if lenient
            else "official (POPE evaluate.py: first sentence, case-sensitive No/no/not)"
        )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "answer_rule": "lenient" if self.lenient else "official"}

    def load(self) -> list[EvalItem]:
        files = self.data_files() if self.data.is_dir() else [self.data]
        files = [f for f in files if f.suffix.lower() in (".json", ".jsonl")]
        items = []
        for path in files:
            from_name = next((s for s in POPE_SPLITS if s in path.stem.lower()), None)
            for row in read_rows(path):
                qid = _require(row, "question_id", "id", where=str(path))
                split = str(_first(row, "category", "split", "pope_split", default=from_name or "all"))
                if len(files) > 1:
                    qid = f"{from_name or path.stem}/{qid}"
                question = _require(row, "text", "question", where=str(path))
                label = str(_require(row, "label", "answer", where=str(path))).strip().lower()
                image = _require(row, "image", where=str(path))
                prompt = _with_suffix(question, self.prompt_suffix)
                items.append(EvalItem(qid, prompt, [image], label, {"split": split}))
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        return M.pope_metrics(
            [answer_text(predictions, it) for it in items],
            [it.target for it in items],
            [it.meta["split"] for it in items],
            lenient=self.lenient,
        )
