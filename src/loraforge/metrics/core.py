"""Task metrics as small functions: texts (or tag lists) in, a `dict[str, float]` out.

Each metric calls the library that defines it and says, in its docstring, which one and with which settings, so a
number here can be reproduced with that library alone. Fractions are in [0, 1] everywhere (BLEU and QA scores too,
where the reference scripts print percentages); perplexity and NIST are on their own scales, and `tokens` and
`invalid` are counts.

Libraries are imported inside the function that uses them: together they take seconds to import, and a run
needs one or two of them.

`METRICS` maps the names task recipes use to these functions. The question-answering metrics live in `qa.py`.
"""
from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence

from loraforge.errors import LoraforgeError
from loraforge.metrics.inputs import Scores, reference_lists, same_length
from loraforge.metrics.qa import squad_em_f1, squad_zh_em_f1

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
PUBMEDQA_LABELS = ("yes", "no", "maybe")


def perplexity(nll_sum: float, n_tokens: int) -> Scores:
    """exp(mean token negative log-likelihood), from the summed NLL (natural log) over `n_tokens` scored tokens.

    Sum the per-token losses over the whole evaluation set first and divide once (a token-weighted mean), not a
    mean of per-batch perplexities. Returns `perplexity` (inf when the exponent overflows), `nll_per_token`, `tokens`.
    """
    if n_tokens <= 0:
        raise LoraforgeError(f"perplexity needs at least one scored token, got n_tokens={n_tokens}.")
    mean_nll = nll_sum / n_tokens
    try:
        ppl = math.exp(mean_nll)
    except OverflowError:
        ppl = math.inf
    return {"perplexity": ppl, "nll_per_token": mean_nll, "tokens": float(n_tokens)}


def perplexity_from_token_losses(token_losses: Sequence[float]) -> Scores:
    """`perplexity` from one natural-log loss per scored token (summed with `math.fsum`)."""
    losses = [float(x) for x in token_losses]
    return perplexity(math.fsum(losses), len(losses))


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Scores:
    """ROUGE-1, ROUGE-2, ROUGE-L F-measure with Google's `rouge-score` package.

    Settings: `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)` with its default tokenizer (lowercase,
    every character outside [a-z0-9] becomes a space, Porter stemming), so it is meant for English: text in other
    scripts tokenizes to nothing and scores 0. `rougeL` is the sentence-level LCS (not `rougeLsum`).
    Several references: per example, the best F-measure over its references, taken per ROUGE type
    (`RougeScorer.score_multi`, the convention of the E2E and GEM scripts); then the mean over examples.
    """
    from rouge_score.rouge_scorer import RougeScorer

    refs = reference_lists(predictions, references, "rouge")
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, example_refs in zip(predictions, refs):
        best = scorer.score_multi(example_refs, prediction)
        for name in ROUGE_TYPES:
            totals[name] += best[name].fmeasure
    return {name: total / len(refs) for name, total in totals.items()}


def bleu_nist(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    lowercase: bool = True,
    smooth_method: str = "exp",
    nist_order: int = 5,
) -> Scores:
    """Corpus BLEU with `sacrebleu` and corpus NIST with `nltk`, on the same tokens.

    BLEU: `sacrebleu.metrics.BLEU(lowercase=lowercase, tokenize="13a", smooth_method=smooth_method)` (4-grams,
    closest reference length for the brevity penalty), `corpus_score` divided by 100. Examples may have different
    numbers of references: the reference streams are padded with None, which sacrebleu skips.
    NIST: `nltk.translate.nist_score.corpus_nist(refs, hyps, n=nist_order)`, n=5 as in the E2E metrics script, on
    sacrebleu's 13a tokens (the mteval-v13a tokenizer the E2E script imitates), lowercased when `lowercase`.
    `lowercase=True` is the E2E script's case-insensitive matching; sacrebleu's own default is case-sensitive.
    nltk scores each example against its best single reference, where mteval clips against all references at
    once, so with several references NIST is close to, not equal to, the E2E script's. NIST is NaN when no
    prediction has `nist_order` tokens (nltk's n-gram precision is then undefined).
    """
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    refs = reference_lists(predictions, references, "bleu_nist")
    most = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(most)]  # (most refs, examples)
    bleu = BLEU(lowercase=lowercase, tokenize="13a", smooth_method=smooth_method).corpus_score(
        list(predictions), streams
    )

    tokenize = Tokenizer13a()

    def tokens(text: str) -> list[str]:
        return tokenize(text.lower() if lowercase else text).split()

    hyp_tokens = [tokens(p) for p in predictions]
    ref_tokens = [[tokens(r) for r in example_refs] for example_refs in refs]
    if max(len(h) for h in hyp_tokens) < nist_order:
        nist = math.nan
    else:
        nist = corpus_nist(ref_tokens, hyp_tokens, n=nist_order)
    return {"bleu": bleu.score / 100, "nist": float(nist)}


def accuracy_macro_f1(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> Scores:
    """Accuracy and macro-F1 over string labels, with scikit-learn; answers outside `labels` count as wrong.

    Labels and predictions are compared after `str.strip()`. `labels` is the set of valid answers (default: the
    labels seen in `references`). A prediction outside it is wrong for accuracy and a miss (false negative) for
    its gold class in F1, and is counted in `invalid`. Macro-F1 is `sklearn.metrics.f1_score(average="macro",
    zero_division=0)` over the labels that occur in the references or among the valid predictions (scikit-learn's
    default label set, minus the invalid strings). Returns `accuracy`, `macro_f1`, `invalid` (a count).
    """
    from sklearn.metrics import accuracy_score, f1_score

    same_length(predictions, references, "accuracy_macro_f1")
    gold = [r.strip() for r in references]
    pred = [p.strip() for p in predictions]
    valid = {x.strip() for x in labels} if labels is not None else set(gold)
    unknown = sorted(set(gold) - valid)
    if unknown:
        raise LoraforgeError(
            f"accuracy_macro_f1: references {unknown} are not among the labels {sorted(valid)}; "
            "add them to the labels or fix the references."
        )
    scored = sorted(set(gold) | (set(pred) & valid))
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=scored, average="macro", zero_division=0)),
        "invalid": float(sum(p not in valid for p in pred)),
    }


def pubmedqa(predictions: Sequence[str], references: Sequence[str]) -> Scores:
    """PubMedQA: `accuracy_macro_f1` over yes/no/maybe, as the PubMedQA paper reports (accuracy and macro-F1).

    Predictions and references are lowercased and stripped of surrounding whitespace and ASCII punctuation first,
    so a generated "Yes." counts as "yes"; anything else is `invalid`.
    """

    def clean(text: str) -> str:
        return text.strip().strip(string.punctuation + " ").lower()

    return accuracy_macro_f1([clean(p) for p in predictions], [clean(r) for r in references], PUBMEDQA_LABELS)


def entity_f1(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], *, strict_iob2: bool = False
) -> Scores:
    """Entity-level micro precision, recall and F1 with `seqeval`, from one tag list per sentence.

    Default: seqeval's default mode (conlleval-compatible: an entity may start with I-, as conlleval.pl allows).
    `strict_iob2=True`: `mode="strict", scheme=IOB2`, where an entity counts only if its tags are well-formed
    IOB2 and match exactly. `zero_division=0`: no predicted (gold) entities gives precision (recall) 0.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    same_length(predictions, references, "seqeval")
    for i, (pred, gold) in enumerate(zip(predictions, references)):
        if len(pred) != len(gold):
            raise LoraforgeError(
                f"seqeval: sentence {i} has {len(pred)} predicted tags for {len(gold)} gold tags; "
                "predict one tag per token."
            )
    gold_lists = [list(tags) for tags in references]
    pred_lists = [list(tags) for tags in predictions]
    options = {"mode": "strict", "scheme": IOB2} if strict_iob2 else {}
    try:
        return {
            "precision": float(precision_score(gold_lists, pred_lists, zero_division=0, **options)),
            "recall": float(recall_score(gold_lists, pred_lists, zero_division=0, **options)),
            "f1": float(f1_score(gold_lists, pred_lists, zero_division=0, **options)),
        }
    except (ValueError, KeyError) as err:
        raise LoraforgeError(f"seqeval could not read the tags ({err}); strict IOB2 needs B-X/I-X/O tags.") from err


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Scores:
    """Corpus chrF (character 6-grams, beta 2) with `sacrebleu.metrics.CHRF`'s defaults, divided by 100. Examples
    may have different numbers of references (the streams are padded with None, which sacrebleu skips)."""
    from sacrebleu.metrics import CHRF

    refs = reference_lists(predictions, references, "chrf")
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(len(r) for r in refs))]
    return {"chrf": CHRF().corpus_score(list(predictions), streams).score / 100}


METRICS: dict[str, Callable[..., Scores]] = {
    "perplexity": perplexity,
    "rouge": rouge,
    "bleu_nist": bleu_nist,
    "chrf": chrf,
    "accuracy_macro_f1": accuracy_macro_f1,
    "pubmedqa": pubmedqa,
    "seqeval": entity_f1,
    "squad_em_f1": squad_em_f1,
    "squad_zh_em_f1": squad_zh_em_f1,
}


TEXT_METRICS = {"exact_match": "squad_em_f1", "token_f1": "squad_em_f1", "rouge_l": "rouge", "bleu": "bleu_nist",
                "chrf": "chrf"}
"""The metrics a declared recipe (`--metric`) scores generated text with: the name a user gives -> the function
(exact_match and token_f1 are SQuAD's normalized EM and token F1, reported together; rouge_l comes with ROUGE-1/2;
bleu with NIST)."""


def get_metric(name: str) -> Callable[..., Scores]:
    """The metric a recipe names, or an error listing the known names."""
    name = TEXT_METRICS.get(name, name)
    if name not in METRICS:
        raise LoraforgeError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}.")
    return METRICS[name]
