"""MME: yes/no perception and cognition subtasks (acc and acc+ per image)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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
from vlmkit.log import get_logger

log = get_logger(__name__)

# -------------------------------------------------------------------------------------------------------- MME
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@register("mme")
class MME(Benchmark):
    """MME as JSON/JSONL (`question_id, image, question|text, answer (Yes/No), category|subtask`) or the
    official release directory: `<subtask>/[images/]NAME.jpg` with
    `<subtask>/[questions_answers_YES_or_NO/]NAME.txt` holding "question<TAB>answer" lines."""

    def __init__(self, data: str | Path, images: str | Path | None = None, prompt_suffix: str | None = None):
        super().__init__(data, images)
        self.prompt_suffix = prompt_suffix
        self.prompt_format = "{question}" + (f"\n{prompt_suffix}" if prompt_suffix else "")

    def load(self) -> list[EvalItem]:
        if self.data.is_dir():
            return self._load_release()
        items = []
        for n, row in enumerate(read_rows(self.data)):
            subtask = str(_require(row, "category", "subtask", "task", where=str(self.data)))
            image = str(_require(row, "image", "image_path", where=str(self.data)))
            question = _require(row, "question", "text", "prompt", where=str(self.data))
            answer = _require(row, "answer", "label", "gt_answer", where=str(self.data))
            qid = _first(row, "question_id", "id", default=f"{subtask}/{image}/{n}")
            prompt = _with_suffix(question, self.prompt_suffix)
            items.append(EvalItem(qid, prompt, [image], str(answer), {"subtask": subtask, "image": image}))
        return items

    def _load_release(self) -> list[EvalItem]:
        items = []
        for task_dir in sorted(p for p in self.data.iterdir() if p.is_dir()):
            qa_dir = task_dir / "questions_answers_YES_or_NO"
            qa_dir = qa_dir if qa_dir.is_dir() else task_dir
            img_dir = task_dir / "images" if (task_dir / "images").is_dir() else task_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next(
                    (img_dir / (txt.stem + e) for e in _IMAGE_EXTS if (img_dir / (txt.stem + e)).is_file()),
                    None,
                )
                if image is None:
                    log.warning("MME: no image for %s; skipped", txt)
                    continue
                ref = str(image.relative_to(self.data))
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for k, line in enumerate(lines):
                    question, _, answer = line.rpartition("\t")
                    prompt = _with_suffix(question.strip(), self.prompt_suffix)
                    meta = {"subtask": task_dir.name, "image": ref}
                    items.append(
                        EvalItem(f"{task_dir.name}/{image.name}/{k}", prompt, [ref], answer.strip(), meta)
                    )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        return M.mme_metrics(
            (it.meta["subtask"], it.meta["image"], answer_text(predictions, it), it.target) for it in items
        )
