"""Benchmark metrics as pure functions: POPE, MME, VQAv2, multiple choice, boxes, captions, exact match."""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from vlmkit.data.grounding import Box

# ----------------------------------------------------------------------------------------------- text helpers
_ARTICLES = ("a", "an", "the")
_NUMBER_WORDS = {
    "zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}  # fmt: skip


def normalize_text(text: str, drop_articles: bool = False) -> str:
    """Lowercase, punctuation removed, whitespace collapsed (articles dropped if asked): for exact match."""
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    if drop_articles:
        words = [w for w in words if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str, drop_articles: bool = False) -> bool:
    return normalize_text(prediction, drop_articles) == normalize_text(reference, drop_articles)


def extract_number(text: str) -> int | None:
    """The first integer in `text`, as digits or a word up to twenty ("three" -> 3); None if there is none."""
    for token in re.findall(r"\d+|[a-z]+", text.lower()):
        if token.isdigit():
            return int(token)
        if token in _NUMBER_WORDS and token != "none":
            return _NUMBER_WORDS[token]
    return None


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------------------------------------------ POPE
_POPE_NO_WORDS = ("No", "no", "not")  # the official script's words, case-sensitive


def pope_yes_no(text: str, lenient: bool = False) -> str:
    """POPE's yes/no for a free-text answer, by the official rule (POPE's `evaluate.py`, LLaVA's `eval_pope.py`).

    The text up to its first "." (the first sentence), commas deleted, split on single spaces: "No", "no" or
    "not" among those words -> "no", else "yes". Case-sensitive and nothing else normalised, exactly as the
    script: "NO" and "Not sure." are "yes". `lenient` (never the default: its numbers are not comparable with
    published ones) lowercases the first sentence and splits it on whitespace and punctuation first.
    """
    sentence = text.split(".")[0]
    if lenient:
        words = re.sub(r"[^\w\s']", " ", sentence.lower()).split()
    else:
        words = sentence.replace(",", "").split(" ")
    return "no" if any(w in words for w in _POPE_NO_WORDS) else "yes"


def binary_metrics(
    predictions: Sequence[str], labels: Sequence[str], positive: str = "yes"
) -> dict[str, float]:
    """accuracy, precision, recall, f1 (of `positive`), yes_ratio (share of positive predictions), n."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = sum(p == positive and t == positive for p, t in zip(predictions, labels))
    fp = sum(p == positive and t != positive for p, t in zip(predictions, labels))
    tn = sum(p != positive and t != positive for p, t in zip(predictions, labels))
    fn = sum(p != positive and t == positive for p, t in zip(predictions, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
    }


def pope_metrics(
    answers: Sequence[str], labels: Sequence[str], splits: Sequence[str], lenient: bool = False
) -> dict[str, float]:
    """POPE over free-text answers (`pope_yes_no`, the official rule unless `lenient`): overall metrics plus
    `<split>_<metric>` for each split present."""
    preds = [pope_yes_no(a, lenient) for a in answers]
    gold = [str(x).strip().lower() for x in labels]
    out = binary_metrics(preds, gold)
    by_split: dict[str, list[int]] = defaultdict(list)
    for i, split in enumerate(splits):
        by_split[split].append(i)
    if len(by_split) > 1 or (by_split and next(iter(by_split)) != "all"):
        for split in sorted(by_split):
            rows = by_split[split]
            sub = binary_metrics([preds[i] for i in rows], [gold[i] for i in rows])
            out.update({f"{split}_{k}": v for k, v in sub.items()})
    return out


# ------------------------------------------------------------------------------------------------------- MME
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip


def mme_yes_no(text: str) -> str:
    """The official MME rule: lowercased answer "yes"/"no", else "yes"/"no" within its first 4 characters,
    else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_metrics(rows: Iterable[tuple[str, Hashable, str, str]]) -> dict[str, float]:
    """MME from (subtask, image, answer text, gold Yes/No) rows.

    Per subtask: accuracy, accuracy+ (share of images whose questions are all right) and score =
    (acc + acc+) * 100; `perception` and `cognition` sum the subtask scores of their groups.
    """
    correct: dict[str, dict[Hashable, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, answer, gold in rows:
        correct[subtask][image].append(mme_yes_no(answer) == str(gold).strip().lower())
    out: dict[str, float] = {}
    perception = cognition = 0.0
    all_q: list[bool] = []
    all_img: list[bool] = []
    for subtask in sorted(correct):
        images = correct[subtask]
        per_q = [c for answers in images.values() for c in answers]
        per_img = [all(answers) for answers in images.values()]
        acc, acc_plus = mean(per_q), mean(per_img)
        score = (acc + acc_plus) * 100
        out.update({f"{subtask}_acc": acc, f"{subtask}_acc_plus": acc_plus, f"{subtask}_score": score})
        if subtask.lower() in MME_COGNITION:
            cognition += score
        else:
            perception += score
        all_q += per_q
        all_img += per_img
    out.update(
        {
            "perception": perception,
            "cognition": cognition,
            "total": perception + cognition,
            "accuracy": mean(all_q),
            "accuracy_plus": mean(all_img),
            "n": len(all_q),
        }
    )
    return out


# ----------------------------------------------------------------------------------------------------- VQAv2
# The rules of the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py), quirks included.
_VQA_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')  # in the official order
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official (mis-written) look-behind
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


def _contractions() -> dict[str, str]:
    """The official contraction map (written without apostrophe -> with); odd entries kept as they are."""
    pairs = (
        "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
        "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
        "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
        "howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd "
        "itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't "
        "mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've "
        "neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at "
        "'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've "
        "shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
        "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's "
        "someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll "
        "someones:someone's somethingd:something'd somethingd've:something'd've "
        "something'dve:something'd've somethingll:something'll thats:that's thered:there'd "
        "thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd "
        "theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas "
        "wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're "
        "whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd "
        "whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're "
        "whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
        "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
        "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've "
        "youll:you'll youre:you're youve:you've"
    )
    return dict(pair.split(":", 1) for pair in pairs.split())


VQA_CONTRACTIONS = _contractions()


def vqa_process_punctuation(text: str) -> str:
    """Official `processPunctuation`: marks next to a space (or any text with a digit,digit) are deleted,
    others become spaces; then periods not followed by a digit are removed (at most 32, as officially)."""
    out = text
    comma_number = _VQA_COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (= 32) positionally, i.e. as `count`.
    return _VQA_PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def vqa_process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words -> digits, no articles, contractions fixed."""
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """A predicted answer as the official evaluation normalizes it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy: the mean over each leave-one-annotator-out subset of min(1, matches / 3).

    As officially, ground-truth answers are punctuation-processed only when the annotators disagree.
    """
    if not gt_answers:
        raise ValueError("no ground-truth answers")
    pred = vqa_normalize(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [vqa_process_punctuation(a) for a in gts]
    accs = [min(1.0, sum(a == pred for a in gts[:i] + gts[i + 1 :]) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


# -------------------------------------------------------------------------------------------- multiple choice
_BARE_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Za-z])\s*(?:[)\].:,]|$)")
_ANSWER_IS = re.compile(
    r"(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*(?:\(([A-Za-z])\)|\b([A-Z])\b)", re.IGNORECASE
)


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None.

    In order: a leading letter ("B", "(B)", "b) cat", "B. cat"); "the answer is (B)" / "Answer: B";
    the one option whose text the answer contains (longest wins over options it contains); the one
    option letter standing alone as a capital word ("I pick B because ...").
    """
    letters = {k.upper(): k for k in options}
    m = _BARE_LETTER.match(text)
    if m and m.group(1).upper() in letters:
        return letters[m.group(1).upper()]
    for m in _ANSWER_IS.finditer(text):
        letter = (m.group(1) or m.group(2) or "").upper()
        if letter in letters:
            return letters[letter]
    lowered = f" {normalize_text(text)} "
    texts = {k: normalize_text(str(v)) for k, v in options.items()}
    found = [k for k, t in texts.items() if t and f" {t} " in lowered]
    found = [k for k in found if not any(o != k and texts[k] in texts[o] for o in found)]
    if len(found) == 1:
        return found[0]
    tokens = set(re.sub(r"[.()\[\],:;!*#{}]", " ", text).split())
    alone = [k for k in options if k.upper() in tokens]
    return alone[0] if len(alone) == 1 else None


# ---------------------------------------------------------------------------------------------------- boxes
def box_accuracy(predicted: Sequence[Box | None], gold: Sequence[Box], threshold: float = 0.5) -> float:
    """Share of predictions whose IoU with the gold box is >= threshold (a missing box counts wrong)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} boxes")
    return mean(float(p is not None and p.iou(g) >= threshold) for p, g in zip(predicted, gold))


# -------------------------------------------------------------------------------------------------- captions
# the tokens pycocoevalcap's PTBTokenizer drops
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def simple_tokenize(text: str) -> str:
    """A pure-Python stand-in for the PTB tokenizer: lowercase, split off punctuation and clitics, drop the
    punctuation PTB drops."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|n't|'m)\b", r"\1 \2", text)
    tokens = re.findall(r"\.\.\.|--|n't|'\w+|\w+(?:[-.']\w+)*|[^\w\s]", text)
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION)


def caption_metrics(
    references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str], tokenizer: str = "auto"
) -> tuple[dict[str, float], str]:
    """BLEU-1..4 and CIDEr from pycocoevalcap's scorers; returns (metrics, tokenizer used).

    `tokenizer`: "ptb" (pycocoevalcap's Stanford PTBTokenizer, needs java), "python" (`simple_tokenize`)
    or "auto" (ptb when `java` is on PATH). Images without a candidate are scored with an empty caption.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "python"
    gts = {k: [{"caption": c} for c in refs] for k, refs in references.items()}
    res = {k: [{"caption": candidates.get(k, "")}] for k in references}
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        gts_tok, res_tok = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    elif tokenizer == "python":
        gts_tok = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in gts.items()}
        res_tok = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in res.items()}
    else:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; known: auto, ptb, python")
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    cider, _ = Cider().compute_score(gts_tok, res_tok)
    out = {f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}
    out["cider"] = float(cider)
    out["n"] = len(references)
    return out, tokenizer


# ----------------------------------------------------------------------------------------------------- judge
_FRACTION = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_judge_score(reply: str) -> float | None:
    """A score in [0, 1] from a judge's reply ("0.7", "Score: 1", "8/10" -> 0.8), clamped; None if none."""
    m = _FRACTION.search(reply)
    if m and float(m.group(2)) > 0:
        return min(1.0, max(0.0, float(m.group(1)) / float(m.group(2))))
    m = _NUMBER.search(reply)
    if m is None:
        return None
    return min(1.0, max(0.0, float(m.group(0))))
