"""Extractive-QA exact match and F1: SQuAD v1.1 for English, CMRC 2018 for Chinese.

Both follow their official evaluation scripts, which are scripts rather than packages, so the few lines of
normalisation are written out here with each script's rules named. Each example is scored against its best gold
answer (max over answers), then averaged; scores are fractions, where the scripts print percentages.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher

from loraforge.metrics.inputs import Scores, reference_lists

# CMRC 2018's `sp_char` list. The official list also holds '……', two characters that a single character never
# equals, so '…' is not removed there and is not here.
CMRC_PUNCTUATION = frozenset(
    "-:_*^/\\~`+=" "，。：？！“”；’《》·、「」（）－～『』"
)
SQUAD_PUNCTUATION = frozenset(string.punctuation)
CJK = re.compile(r"[\u4e00-\u9fa5]")  # the official script's range for "a Chinese character"


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 `normalize_answer`: lowercase, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in SQUAD_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    """SQuAD v1.1 token F1: bag-of-words overlap of the normalised, whitespace-split answers."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Scores:
    """SQuAD v1.1 `exact_match` and `f1` (official evaluate-v1.1.py rules), max over each example's gold answers.

    Normalisation (`normalize_answer`): lowercase, remove `string.punctuation`, remove the articles a/an/the as
    whole words, collapse whitespace. EM compares the normalised strings; F1 is the token-bag overlap.
    """
    golds = reference_lists(predictions, references, "squad_em_f1")
    em = f1 = 0.0
    for prediction, answers in zip(predictions, golds):
        em += max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
        f1 += max(squad_f1(prediction, a) for a in answers)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}


def cmrc_segments(text: str) -> list[str]:
    """CMRC 2018 `mixed_segmentation(text, rm_punc=True)`: each Chinese character is a unit, other runs are words.

    Lowercase and strip, drop `CMRC_PUNCTUATION` characters outright (they do not split a run), make each character
    in U+4E00..U+9FA5 its own segment, and tokenize the text between them with NLTK's Treebank word tokenizer. The
    official script calls `nltk.word_tokenize`, which first splits sentences with the punkt model, a data download;
    `preserve_line=True` skips that step, which only matters for a run holding several sentences.
    """
    from nltk.tokenize import word_tokenize

    segments: list[str] = []
    run = ""
    for ch in text.lower().strip():
        if ch in CMRC_PUNCTUATION:
            continue
        if CJK.match(ch):
            segments.extend(word_tokenize(run, preserve_line=True) if run else [])
            segments.append(ch)
            run = ""
        else:
            run += ch
    segments.extend(word_tokenize(run, preserve_line=True) if run else [])
    return segments


def cmrc_f1(prediction: str, gold: str) -> float:
    """CMRC 2018 F1: precision and recall of the longest common *contiguous* run of segments (not a bag overlap)."""
    pred, ans = cmrc_segments(prediction), cmrc_segments(gold)
    # The official find_lcs: longest common substring of the two segment lists. With no junk heuristics,
    # difflib's longest matching block is exactly that.
    lcs = SequenceMatcher(None, ans, pred, autojunk=False).find_longest_match(0, len(ans), 0, len(pred)).size
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ans)
    return 2 * precision * recall / (precision + recall)


def cmrc_em(prediction: str, gold: str) -> float:
    """CMRC 2018 EM: equal after lowercase, strip and removal of `CMRC_PUNCTUATION` (inner spaces are kept)."""

    def clean(text: str) -> str:
        return "".join(ch for ch in text.lower().strip() if ch not in CMRC_PUNCTUATION)

    return float(clean(prediction) == clean(gold))


def squad_zh_em_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Scores:
    """Chinese extractive QA `exact_match` and `f1` by the CMRC 2018 official script (v5), max over gold answers.

    Mixed text is segmented by `cmrc_segments`: a Chinese character is one unit, an English word or number is
    one unit (NLTK Treebank tokens), so F1 is character-level for Chinese and word-level for English. F1 is from
    the longest common contiguous segment run (`cmrc_f1`); EM from punctuation-stripped strings (`cmrc_em`).
    ASCII punctuation other than -:_*^/\\~`+= is not removed (the official list) and counts as a token.
    """
    golds = reference_lists(predictions, references, "squad_zh_em_f1")
    em = f1 = 0.0
    for prediction, answers in zip(predictions, golds):
        em += max(cmrc_em(prediction, a) for a in answers)
        f1 += max(cmrc_f1(prediction, a) for a in answers)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}
