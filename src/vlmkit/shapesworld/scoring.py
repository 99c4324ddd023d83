"""The ShapesWorld suite: score every task type of a split at once, from saved predictions or a model; the
`shapesworld` benchmark adapter (`vlmkit eval --benchmark shapesworld`)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.data.grounding import Box, parse_boxes
from vlmkit.eval import metrics as M
from vlmkit.eval.benchmarks import Benchmark, EvalItem, Prediction, register
from vlmkit.eval.runner import run_eval
from vlmkit.infer.generate import ChatResult, Predictor
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vlm import VisionLanguageModel

# task -> the accuracy metric it reports (pope reports the POPE metrics instead)
TASK_METRICS = {
    "attribute_qa": "attribute_qa_acc",
    "counting": "counting_acc",
    "spatial": "spatial_acc",
    "grounding": "grounding_acc50",
    "region": "region_acc",
    "caption": "caption_exact",
}


def _as_predictions(
    predictions: Mapping[Any, Any] | Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """{id: text}, {id: {"answer", "box"?}} or [{"question_id", "answer", ...}] -> {str(id): record}."""
    if isinstance(predictions, Mapping):
        return {str(k): v if isinstance(v, Mapping) else {"answer": v} for k, v in predictions.items()}
    return {str(p["question_id"]): p for p in predictions}


def _predicted_box(prediction: Mapping[str, Any], meta: Mapping[str, Any]) -> Box | None:
    if "box" in prediction:  # written by the runner, already in image pixels
        return Box(*prediction["box"]) if prediction["box"] else None
    found = parse_boxes(
        str(prediction.get("answer") or ""), meta.get("grounding_format"), meta["width"], meta["height"]
    )
    return found[0][1] if found else None


def record_correct(record: Mapping[str, Any], prediction: Mapping[str, Any]) -> bool:
    """Whether a prediction answers one (non-POPE) ShapesWorld record correctly."""
    task, gold, meta = record["task"], str(record["answer"]), record.get("meta", {})
    text = str(prediction.get("answer") or "")
    if task == "counting":
        return M.extract_number(text) == int(gold)
    if task == "spatial" and gold in ("yes", "no"):
        return M.pope_yes_no(text) == gold
    if task == "grounding":
        box = _predicted_box(prediction, meta)
        return box is not None and box.iou(Box(*map(float, meta["target"]["box"]))) >= 0.5
    if task == "caption":
        return M.exact_match(text, gold)
    return M.exact_match(text, gold, drop_articles=True)  # attribute_qa, region, spatial names


def score_shapesworld(
    records: Sequence[Mapping[str, Any]], predictions: Mapping[Any, Any] | Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Metrics of a ShapesWorld split from predictions (see `_as_predictions` for the accepted shapes).

    `<task>_acc` for attribute_qa / counting / spatial / region, `grounding_acc50` (IoU ≥ 0.5),
    `caption_exact` (normalized exact match), `pope_accuracy/precision/recall/f1/yes_ratio` (official POPE
    answer rule) and `n_<task>` counts; a missing prediction counts as an empty answer. Tasks absent from
    the split report only `n_<task>` = 0.
    """
    preds = _as_predictions(predictions)
    right: dict[str, list[bool]] = defaultdict(list)
    pope_answers: list[str] = []
    pope_labels: list[str] = []
    for record in records:
        prediction = preds.get(str(record["id"]), {})
        if record["task"] == "pope":
            pope_answers.append(str(prediction.get("answer") or ""))
            pope_labels.append(str(record["answer"]))
            continue
        right[record["task"]].append(record_correct(record, prediction))
    out: dict[str, float] = {}
    for task, name in TASK_METRICS.items():
        if right.get(task):
            out[name] = M.mean(right[task])
    if pope_labels:
        pope = M.binary_metrics([M.pope_yes_no(a) for a in pope_answers], pope_labels)
        out.update({f"pope_{k}": v for k, v in pope.items() if k != "n"})
    for task in sorted(set(TASK_METRICS) | {"pope"} | set(right)):
        out[f"n_{task}"] = len(pope_labels) if task == "pope" else len(right.get(task, []))
    if any(t not in TASK_METRICS for t in right):
        for task in sorted(t for t in right if t not in TASK_METRICS):
            out[f"{task}_acc"] = M.mean(right[task])
    return out


def evaluate_shapesworld(
    model_or_predictor: VisionLanguageModel | Predictor,
    data_json: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    out_dir: str | Path | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Run a model on a ShapesWorld split (greedy, batched) and return `score_shapesworld`'s metrics.

    With `out_dir`, predictions.jsonl / results.json (with provenance) are written there and a rerun resumes.
    """
    bench = ShapesWorld(data_json, image_root)
    results = run_eval(
        model_or_predictor,
        bench,
        out_dir,
        batch_size=batch_size,
        generation=GenerationConfig(max_new_tokens=max_new_tokens),
        seed=seed,
        progress=progress,
    )
    return results["metrics"]


# ------------------------------------------------------------------------------------------------ ShapesWorld
@register("shapesworld")
class ShapesWorld(Benchmark):
    """A ShapesWorld split (`vlmkit data synth`): every task type at once, scored by `score_shapesworld`."""

    max_new_tokens = 64
    prompt_format = "<image>\n{question} (the record's user turn, as in training)"

    def load(self) -> list[EvalItem]:
        records = json.loads(self.data.read_text(encoding="utf-8"))
        items = []
        for r in records:
            user = next(t["value"] for t in r["conversations"] if t["from"] in ("human", "user"))
            items.append(EvalItem(r["id"], user, [r["image"]], r["answer"], {"record": r}))
        return items

    def prediction(self, item: EvalItem, result: ChatResult) -> Prediction:
        out: Prediction = {
            "question_id": item.question_id,
            "answer": result.text,
            "task": item.meta["record"]["task"],
        }
        if out["task"] == "grounding":
            out["box"] = list(result.boxes[0][1].to_xyxy()) if result.boxes else None
        return out

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, Prediction]) -> dict[str, float]:
        return score_shapesworld([it.meta["record"] for it in items], predictions)
