"""Eval metrics vs hand-computed values (POPE, MME, VQAv2, choices, boxes, judge) and vs pycocoevalcap."""

from __future__ import annotations

import shutil

import pytest

from vlmkit.data.grounding import Box
from vlmkit.eval import metrics as M

# ------------------------------------------------------------------------------------------------------ POPE
# The official rule (POPE's evaluate.py, also LLaVA's eval_pope.py): the text up to its first ".", commas deleted,
# split on single spaces; "No", "no" or "not" among those words -> "no", else "yes". Case-sensitive, nothing
# stripped, no other punctuation removed. The expected values are what that script gives for each text.
OFFICIAL_POPE_CASES = [
    ("Yes, there is a dog in the image.", "yes"),
    ("No.", "no"),
    ("no", "no"),
    ("No, there is no cat", "no"),  # the comma is deleted: "No" is a word
    ("There is not a dog.", "no"),
    ("NO", "yes"),  # case-sensitive: "NO" is none of No / no / not
    ("Not sure, maybe.", "yes"),  # "Not" is not "not"
    ("Not at all.", "yes"),
    ("I see a dog. There is no cat.", "yes"),  # only the first sentence counts
    ("Nope", "yes"),  # not the word "no"
    ("no!", "yes"),  # only commas are removed: "no!" is not "no"
    ("No,there is none", "yes"),  # the comma is deleted, not replaced: "Nothere"
    ("no\nthere is", "yes"),  # split on spaces only
    (" No", "no"),  # nothing is stripped; "" and "No" are the words
    ("It's not.", "no"),
    ("There are 2.5 cats, no dogs", "yes"),  # the first "." ends the sentence, even inside a number
    ("", "yes"),
]


@pytest.mark.parametrize(("text", "expected"), OFFICIAL_POPE_CASES)
def test_pope_yes_no_is_the_official_rule(text: str, expected: str) -> None:
    assert M.pope_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("NO", "no"),
        ("Not sure, maybe.", "no"),
        ("no!", "no"),
        ("No,there is none", "no"),
        ("no\nthere is", "no"),
        ("Yes, there is a dog.", "yes"),
        ("I see a dog. There is no cat.", "yes"),  # still the first sentence only
        ("Nope", "yes"),
    ],
)
def test_pope_yes_no_lenient_variant(text: str, expected: str) -> None:
    assert M.pope_yes_no(text, lenient=True) == expected


def test_pope_metrics_official_by_default_lenient_on_request() -> None:
    answers, labels = ["NO", "Not really.", "Yes"], ["no", "no", "yes"]
    official = M.pope_metrics(answers, labels, ["all"] * 3)
    assert official["yes_ratio"] == 1.0 and official["accuracy"] == pytest.approx(1 / 3)
    lenient = M.pope_metrics(answers, labels, ["all"] * 3, lenient=True)
    assert lenient["yes_ratio"] == pytest.approx(1 / 3) and lenient["accuracy"] == 1.0


def test_binary_metrics_hand_computed() -> None:
    # TP: 0, 4; FP: 1; TN: 2; FN: 3
    out = M.binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(3 / 5)
    assert out["n"] == 5


def test_binary_metrics_no_positive_predictions_is_zero_not_error() -> None:
    out = M.binary_metrics(["no", "no"], ["yes", "no"])
    assert (out["precision"], out["recall"], out["f1"], out["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_pope_metrics_per_split_and_overall() -> None:
    answers = ["Yes", "No", "Yes", "Yes"]
    labels = ["yes", "no", "no", "yes"]
    splits = ["random", "random", "adversarial", "adversarial"]
    out = M.pope_metrics(answers, labels, splits)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["random_accuracy"] == 1.0 and out["random_f1"] == 1.0
    assert out["adversarial_accuracy"] == 0.5
    assert out["adversarial_precision"] == 0.5 and out["adversarial_recall"] == 1.0
    assert out["adversarial_yes_ratio"] == 1.0
    assert out["random_n"] == 2


# ------------------------------------------------------------------------------------------------------- MME
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("No, it is not.", "no"),
        (" yes it is", "yes"),
        ("The answer is yes", "other"),
    ],
)
def test_mme_yes_no(text: str, expected: str) -> None:
    assert M.mme_yes_no(text) == expected


def test_mme_scores_acc_plus_and_totals() -> None:
    rows = [
        # existence: img1 both right, img2 one right -> acc 3/4, acc+ 1/2 -> score 125
        ("existence", "img1", "Yes", "Yes"),
        ("existence", "img1", "No", "No"),
        ("existence", "img2", "Yes", "Yes"),
        ("existence", "img2", "Yes", "No"),
        # code_reasoning (cognition): img3 both wrong, img4 both right -> acc 1/2, acc+ 1/2 -> score 100
        ("code_reasoning", "img3", "No", "Yes"),
        ("code_reasoning", "img3", "maybe", "No"),
        ("code_reasoning", "img4", "Yes", "Yes"),
        ("code_reasoning", "img4", "No", "No"),
    ]
    out = M.mme_metrics(rows)
    assert out["existence_acc"] == 0.75 and out["existence_acc_plus"] == 0.5
    assert out["existence_score"] == pytest.approx(125.0)
    assert out["code_reasoning_score"] == pytest.approx(100.0)
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(100.0)
    assert out["total"] == pytest.approx(225.0)
    assert out["accuracy"] == pytest.approx(5 / 8) and out["accuracy_plus"] == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------------------------------- VQAv2
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs", "2 dogs"),
        ("the cat", "cat"),
        ("dont", "don't"),
        ("yes.", "yes"),
        ("1,000", "1000"),  # digit,digit in the text: marks are deleted, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("hello-world", "hello world"),  # a mark with no space around it becomes a space
        ("hello - world", "hello world"),  # next to a space: deleted
        ("An apple!\n", "apple"),
    ],
)
def test_vqa_normalize(raw: str, expected: str) -> None:
    assert M.vqa_normalize(raw) == expected


def test_vqa_contraction_map_has_official_entries() -> None:
    assert M.VQA_CONTRACTIONS["whats"] == "what's"
    assert M.VQA_CONTRACTIONS["somebody'd"] == "somebodyd"  # the official map's odd entry, kept
    assert len(M.VQA_CONTRACTIONS) == 120


def test_vqa_soft_accuracy_leave_one_out() -> None:
    assert M.vqa_accuracy("two", ["2"] * 10) == pytest.approx(1.0)
    gts = ["cat"] * 2 + ["dog"] * 8
    # cat left out (x2): 1 match -> 1/3; dog left out (x8): 2 matches -> 2/3
    assert M.vqa_accuracy("cat", gts) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert M.vqa_accuracy("Dog", gts) == pytest.approx(1.0)
    # cat left out: 0 matches; dog left out (x9): 1 match -> 1/3
    assert M.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert M.vqa_accuracy("bird", gts) == 0.0


def test_vqa_gt_answers_processed_only_when_annotators_disagree() -> None:
    # The official quirk: unanimous answers are compared raw, so "x-y" never equals the normalized "x y".
    assert M.vqa_accuracy("x-y", ["x-y"] * 10) == 0.0
    assert M.vqa_accuracy("x-y", ["x-y"] * 9 + ["c"]) == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------- multiple choice
OPTIONS = {"A": "dog", "B": "cat", "C": "red car", "D": "car"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b) cat", "B"),
        ("B. cat", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("the answer is (d)", "D"),
        ("A cat.", "B"),  # "A" is an article here: the option text decides
        ("It is a red car.", "C"),  # "car" is inside "red car": the longer option wins
        ("I pick B because it purrs", "B"),
        ("a dog and a cat", None),  # two options named
        ("no idea", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert M.extract_choice(text, OPTIONS) == expected


# ---------------------------------------------------------------------------------------------------- boxes
def test_box_accuracy_at_iou_half() -> None:
    gold = Box(0, 0, 10, 10)
    preds = [Box(0, 0, 10, 10), Box(0, 0, 10, 5), Box(5, 5, 15, 15), None]  # IoU 1, 0.5, 25/175, missing
    assert M.box_accuracy(preds, [gold] * 4) == 0.5


# ------------------------------------------------------------------------------------------------- captions
REFS = {
    1: ["A man riding a horse on a beach.", "A person rides a brown horse along the shore."],
    2: ["Two cats sleeping on a red couch.", "A pair of cats asleep on the sofa."],
    3: ["A plate of food with broccoli and rice.", "Rice and broccoli served on a white plate."],
}
CANDS = {
    1: "A man rides a horse on the beach.",
    2: "Two cats are sleeping on a couch.",
    3: "A plate of rice.",
}


def _direct_pycocoevalcap(tokenize) -> tuple[float, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tokenize({k: [{"caption": CANDS[k]}] for k in REFS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return bleu[3], cider


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")
def test_caption_metrics_equal_pycocoevalcap_with_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out, used = M.caption_metrics(REFS, CANDS, "auto")
    bleu4, cider = _direct_pycocoevalcap(PTBTokenizer().tokenize)
    assert used == "ptb"
    assert out["bleu4"] == bleu4 and out["cider"] == cider
    assert 0.0 < out["bleu4"] < 1.0 and out["cider"] > 0.0


def test_caption_metrics_python_tokenizer_fallback() -> None:
    def tokenize(d):
        return {k: [M.simple_tokenize(c["caption"]) for c in v] for k, v in d.items()}

    out, used = M.caption_metrics(REFS, CANDS, "python")
    bleu4, cider = _direct_pycocoevalcap(tokenize)
    assert used == "python"
    assert out["bleu4"] == bleu4 and out["cider"] == cider
    perfect, _ = M.caption_metrics(
        {1: ["a red circle and a blue square"]}, {1: "A red circle and a blue square."}, "python"
    )
    assert perfect["bleu4"] == pytest.approx(1.0)


def test_simple_tokenize_matches_ptb_conventions() -> None:
    assert M.simple_tokenize("A man's dog, running.") == "a man 's dog running"
    assert M.simple_tokenize("It isn't red!") == "it is n't red"


# ---------------------------------------------------------------------------------------------------- misc
@pytest.mark.parametrize(
    ("reply", "expected"),
    [("0.7", 0.7), ("Score: 1.0", 1.0), ("8/10", 0.8), ("1.5", 1.0), ("-0.2", 0.0), ("no score", None)],
)
def test_parse_judge_score(reply: str, expected: float | None) -> None:
    assert M.parse_judge_score(reply) == (pytest.approx(expected) if expected is not None else None)


def test_normalize_and_numbers() -> None:
    assert M.normalize_text("  A Red circle, and a  blue square. ") == "a red circle and a blue square"
    assert M.normalize_text("The red circle", drop_articles=True) == "red circle"
    assert M.extract_number("There are three objects") == 3
    assert M.extract_number("I count 12, not 3") == 12
    assert M.extract_number("none here") is None
