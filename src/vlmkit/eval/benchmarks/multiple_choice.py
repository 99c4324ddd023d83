"""Multiple choice (MMBench, ScienceQA): generated letters, constrained decoding or option likelihoods."""

from __future__ import annotations

import json
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
    answer_text,
    read_rows,
    register,
)
from vlmkit.eval.choice import constrained_choice, option_logprobs
from vlmkit.infer.generate import Predictor
from vlmkit.models.generation import GenerationConfig

# -------------------------------------------------------------------------------------------- multiple choice
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_SUFFIX = {
    "letter": "Answer with the option's letter from the given choices directly.",
    "text": "Answer with the option's text from the given choices directly.",
}
MC_MODES = ("generate", "constrained", "likelihood")


def _options(row: Mapping[str, Any], where: str) -> dict[str, str]:
    raw = _first(row, "options", "choices")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if isinstance(raw, list):
        return {_LETTERS[i]: str(v) for i, v in enumerate(raw)}
    if isinstance(raw, dict):
        return {str(k).upper(): str(v) for k, v in raw.items()}
    options = {k: str(row[k]) for k in _LETTERS if _first(row, k) is not None}
    if not options:
        raise ValueError(f"{where}: record has no options (an `options`/`choices` list or A/B/C/D keys)")
    return options


def _gold_letter(row: Mapping[str, Any], options: Mapping[str, str], where: str) -> str:
    answer = _require(row, "answer", "label", where=where)
    if isinstance(answer, int):  # ScienceQA: the index of the right choice
        return list(options)[answer]
    answer = str(answer).strip()
    if answer.upper() in options:
        return answer.upper()
    by_text = [k for k, v in options.items() if v.strip().lower() == answer.lower()]
    if by_text:
        return by_text[0]
    raise ValueError(f"{where}: answer {answer!r} is neither an option letter nor an option's text")


@register("multiple-choice", "mmbench", "scienceqa")
class MultipleChoice(Benchmark):
    """`question_id, question, options (list or A/B/C/D keys), answer (letter), hint?, image?` (JSON[L]/TSV).

    mode: `generate` (free text; the letter is extracted), `constrained` (decoding restricted to the options
    by a prefix trie) or `likelihood` (the option with the best sum/mean log-prob). `target`: what the
    model writes, the option's `letter` or its `text`.
    """

    def __init__(
        self,
        data: str | Path,
        images: str | Path | None = None,
        mode: str = "generate",
        target: str = "letter",
        reduce: str = "sum",
        prompt_suffix: str | None = None,
    ):
        super().__init__(data, images)
        if mode not in MC_MODES:
            raise ValueError(f"unknown multiple-choice mode {mode!r}; known: {', '.join(MC_MODES)}")
        if target not in MC_SUFFIX:
            raise ValueError(f"unknown multiple-choice target {target!r}; known: letter, text")
        if reduce not in ("sum", "mean"):
            raise ValueError(f"unknown likelihood reduction {reduce!r}; known: sum, mean")
        self.mode, self.target, self.reduce = mode, target, reduce
        self.prompt_suffix = prompt_suffix if prompt_suffix is not None else MC_SUFFIX[target]
        self.prompt_format = "[{hint}\\n]{question}\\n{letter}. {option}...\\n" + self.prompt_suffix

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mode": self.mode, "target": self.target, "reduce": self.reduce}

    def load(self) -> list[EvalItem]:
        items = []
        where = str(self.data)
        for n, row in enumerate(read_rows(self.data)):
            options = _options(row, where)
            qid = _first(row, "question_id", "index", "id", default=n)
            hint = _first(row, "hint", "context")
            question = str(_require(row, "question", "text", where=where))
            lines = ([str(hint)] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
            prompt = "\n".join(lines + ([self.prompt_suffix] if self.prompt_suffix else []))
            image = _first(row, "image", "image_path")
            meta = {"options": options, "category": str(_first(row, "category", default="")) or None}
            items.append(
                EvalItem(qid, prompt, [str(image)] if image else [], _gold_letter(row, options, where), meta)
            )
        return items

    def predict(
        self, predictor: Predictor, items: Sequence[EvalItem], config: GenerationConfig
    ) -> list[Prediction]:
        if self.mode == "generate":
            return super().predict(predictor, items, config)
        model, tok = predictor.model, predictor.model.tokenizer
        out = []
        for item in items:
            batch, _ = predictor.prepare([self.request(item)])  # one row: no padding
            prompt_ids = batch["input_ids"][0].tolist()
            pixel_values, images = batch["pixel_values"], batch["image_counts"][0]
            letters = list(item.meta["options"])
            texts = letters if self.target == "letter" else [item.meta["options"][k] for k in letters]
            option_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            record: Prediction = {"question_id": item.question_id}
            if self.mode == "constrained":
                index = constrained_choice(model, prompt_ids, pixel_values, option_ids, images)
            else:
                scores = option_logprobs(model, prompt_ids, pixel_values, option_ids, images)
                pick = [s if self.reduce == "sum" else m for s, m in scores]
                index = max(range(len(pick)), key=pick.__getitem__)
                record["option_logprobs"] = {k: {"sum": s, "mean": m} for k, (s, m) in zip(letters, scores)}
            record["answer"] = texts[index]
            record["choice"] = letters[index]
            out.append(record)
        return out

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        right, unparsed = [], 0
        by_cat: dict[str, list[bool]] = defaultdict(list)
        for it in items:
            pred = predictions.get(it.key, {})
            letter = pred.get("choice") or M.extract_choice(answer_text(predictions, it), it.meta["options"])
            unparsed += letter is None
            ok = letter == it.target
            right.append(ok)
            if it.meta.get("category"):
                by_cat[it.meta["category"]].append(ok)
        out = {
            "accuracy": M.mean(right),
            "unparsed": unparsed / len(items) if items else 0.0,
            "n": len(items),
        }
        for cat in sorted(by_cat):
            out[f"accuracy_{re.sub(r'[^0-9a-zA-Z]+', '_', cat).strip('_')}"] = M.mean(by_cat[cat])
        return out
