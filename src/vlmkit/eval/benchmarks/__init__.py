"""Benchmark adapters, one per module: read local files, build ChatRequests, turn model outputs into predictions,
score with the official rules. Each registers itself in BENCHMARKS (a plugin can add more); `build_benchmark`
picks one by name."""

from __future__ import annotations

from vlmkit.eval.benchmarks import captioning, grounding, judged, mme, multiple_choice, pope, vqav2  # noqa: F401
from vlmkit.eval.benchmarks.base import (
    BENCHMARKS,
    POPE_SPLITS,
    SHORT_ANSWER,
    Benchmark,
    EvalItem,
    Prediction,
    answer_text,
    build_benchmark,
    read_rows,
    register,
)
from vlmkit.eval.benchmarks.captioning import Captioning
from vlmkit.eval.benchmarks.grounding import Grounding
from vlmkit.eval.benchmarks.judged import JudgedQA
from vlmkit.eval.benchmarks.mme import MME
from vlmkit.eval.benchmarks.multiple_choice import MultipleChoice
from vlmkit.eval.benchmarks.pope import Pope
from vlmkit.eval.benchmarks.vqav2 import VQAv2

__all__ = [
    "BENCHMARKS",
    "MME",
    "POPE_SPLITS",
    "SHORT_ANSWER",
    "Benchmark",
    "Captioning",
    "EvalItem",
    "Grounding",
    "JudgedQA",
    "MultipleChoice",
    "Pope",
    "Prediction",
    "VQAv2",
    "answer_text",
    "build_benchmark",
    "read_rows",
    "register",
]
