"""Every metric against numbers worked out by hand on inputs small enough to count, arithmetic in the comment.

The libraries compute; these tests pin what they must give under the settings `loraforge.eval` documents, so a
change of library version, setting or aggregation shows up as a wrong number.
"""
from __future__ import annotations

import math

import pytest

from loraforge.errors import LoraforgeError
from loraforge.metrics import (
    METRICS,
    accuracy_macro_f1,
    bleu_nist,
    entity_f1,
    get_metric,
    normalize_answer,
    perplexity,
    perplexity_from_token_losses,
    pubmedqa,
    rouge,
    squad_em_f1,
    squad_zh_em_f1,
)
from loraforge.metrics.qa import cmrc_em, cmrc_f1, cmrc_segments

TOL = 1e-4  # the expected values below are written to 4-6 decimals


def test_perplexity_from_sum_and_from_token_losses():
    # exp(6.0 / 3) = e^2 = 7.389056
    assert perplexity(6.0, 3) == pytest.approx({"perplexity": 7.389056, "nll_per_token": 2.0, "tokens": 3.0}, abs=TOL)
    # losses ln 2 and ln 8: mean = ln(16) / 2 = ln 4, so perplexity 4
    assert perplexity_from_token_losses([math.log(2), math.log(8)])["perplexity"] == pytest.approx(4.0, abs=1e-9)


def test_perplexity_overflow_is_inf_and_no_tokens_is_an_error():
    assert perplexity(1e6, 1)["perplexity"] == math.inf
    with pytest.raises(LoraforgeError, match="at least one scored token"):
        perplexity(0.0, 0)


def test_rouge_f_measure_max_over_references_then_mean():
    # 1) "the cat sat" vs "the cat ran": unigrams 2 of 3 both ways -> F1 = 2/3; bigrams {the cat} 1 of 2 -> 1/2;
    #    LCS "the cat" = 2 -> 2/3.
    # 2) "the dog sat" vs "the dogs sat": the stemmer makes dogs -> dog, so all three scores are 1
    #    (the other reference, "a dog barked", gives R1 = 1/3 and loses the max).
    # mean: R1 = (2/3 + 1) / 2 = 0.833333, R2 = (1/2 + 1) / 2 = 0.75, RL = 0.833333
    scores = rouge(["the cat sat", "the dog sat"], ["the cat ran", ["a dog barked", "the dogs sat"]])
    assert scores == pytest.approx({"rouge1": 0.833333, "rouge2": 0.75, "rougeL": 0.833333}, abs=TOL)


def test_bleu_by_hand_with_variable_reference_counts_and_brevity_penalty():
    # Lowercased (the default), 13a tokens, no smoothing.
    # 1) "the cat sat on the mat" vs "the cat sat on a mat" (6 tokens each)
    #    1-grams: the(clipped to 1) cat sat on mat = 5/6;  2-grams: the cat, cat sat, sat on = 3/5
    #    3-grams: the cat sat, cat sat on = 2/4;          4-grams: the cat sat on = 1/3
    # 2) "hello there" vs two references (lengths 3 and 4): 1-grams 2/2, 2-grams 1/1, no 3- or 4-grams
    # corpus precisions: 7/8, 4/6, 2/4, 1/3 -> geometric mean (7/72)^(1/4) = 0.558395
    # closest reference lengths: 6 + 3 = 9, hypothesis 8 -> BP = exp(1 - 9/8) = 0.882497
    # BLEU = 0.882497 * 0.558395 = 0.492782
    predictions = ["The cat sat on the mat", "hello there"]
    references = ["the cat sat on a mat", ["hello there friend", "hello there my friend"]]
    assert bleu_nist(predictions, references, smooth_method="none")["bleu"] == pytest.approx(0.492782, abs=TOL)
    # case-sensitive: "The" no longer matches, so no 4-gram matches at all and unsmoothed BLEU is 0
    assert bleu_nist(predictions, references, smooth_method="none", lowercase=False)["bleu"] == 0.0


def test_nist_by_hand_information_weights_and_length_penalty():
    # references: "x y x z" and "q q q q q" -> 9 words; counts x 2, y 1, z 1, q 5; xy 1, yx 1, xz 1, qq 4
    # info(w) = log2(9 / count(w)); info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))
    # 1-grams: x twice, y, z from "x y x z w"; q once from "q" -> 2*log2(9/2) + 2*log2(9) + log2(9/5)
    #          = 4.339850 + 6.339850 + 0.847997 = 11.527697, over 5 + 1 hypothesis words = 1.921283
    # 2-grams: xy log2(2/1) = 1, yx log2(1/1) = 0, xz log2(2/1) = 1 -> 2, over 4 bigrams = 0.5
    # 3- to 5-grams match but carry 0 information (each follows its prefix every time)
    # length: 6 hypothesis words / 9 reference words = 2/3 -> penalty 0.5 by NIST's choice of beta
    # NIST = 0.5 * (1.921283 + 0.5) = 1.210641
    scores = bleu_nist(["x y x z w", "q"], ["x y x z", "q q q q q"])
    assert scores["nist"] == pytest.approx(1.210641, abs=TOL)


def test_nist_is_nan_when_no_prediction_reaches_the_ngram_order():
    # no prediction has 5 tokens, so nltk's 5-gram precision would be 0/0
    assert math.isnan(bleu_nist(["a b", "c"], ["a b", "c"])["nist"])


def test_accuracy_macro_f1_counts_an_invalid_answer_as_a_miss():
    # gold a b b c, predicted a b c x ("x" is not a label; " b" is stripped to "b")
    # accuracy 2/4 = 0.5
    # a: TP 1 -> F1 1;  b: TP 1, FN 1 -> P 1, R 1/2, F1 2/3;  c: FP 1 (b->c), FN 1 (c->x) -> F1 0
    # macro over a, b, c = (1 + 2/3 + 0) / 3 = 5/9 = 0.555556. Not 5/12 (x as a class), and the declared but
    # unseen label "d" is not averaged in either.
    scores = accuracy_macro_f1(["a", " b", "c", "x"], ["a", "b", "b", "c"], labels=["a", "b", "c", "d"])
    assert scores == pytest.approx({"accuracy": 0.5, "macro_f1": 0.555556, "invalid": 1.0}, abs=TOL)


def test_accuracy_macro_f1_refuses_a_reference_outside_the_labels():
    with pytest.raises(LoraforgeError, match="not among the labels"):
        accuracy_macro_f1(["a"], ["z"], labels=["a", "b"])


def test_pubmedqa_yes_no_maybe():
    # "Yes." -> yes (right), "no" (right), "I think so" (invalid, gold maybe), "no" (gold yes) -> accuracy 2/4
    # yes: TP 1, FN 1 -> 2/3;  no: TP 1, FP 1 -> 2/3;  maybe: FN 1 -> 0;  macro = 4/9 = 0.444444
    scores = pubmedqa(["Yes.", "no", "I think so", "no"], ["yes", "no", "maybe", "yes"])
    assert scores == pytest.approx({"accuracy": 0.5, "macro_f1": 0.444444, "invalid": 1.0}, abs=TOL)


GOLD_TAGS = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
PRED_TAGS = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O"]]


def test_seqeval_default_mode_counts_entities():
    # gold entities: PER(0-1), LOC(3), ORG(s2 0); predicted: PER(0-1), ORG(3), ORG(s2 0: conlleval lets I- start one)
    # correct: PER and s2 ORG -> P = 2/3, R = 2/3, F1 = 2/3
    scores = entity_f1(PRED_TAGS, GOLD_TAGS)
    assert scores == pytest.approx({"precision": 0.666667, "recall": 0.666667, "f1": 0.666667}, abs=TOL)


def test_seqeval_strict_iob2_drops_an_entity_that_starts_with_i():
    # strict IOB2: "I-ORG" cannot open an entity -> predicted PER, ORG(3); correct PER only
    # P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 0.4
    scores = entity_f1(PRED_TAGS, GOLD_TAGS, strict_iob2=True)
    assert scores == pytest.approx({"precision": 0.5, "recall": 0.333333, "f1": 0.4}, abs=TOL)


def test_seqeval_refuses_tag_lists_of_different_lengths():
    with pytest.raises(LoraforgeError, match="sentence 0 has 1 predicted tags for 2"):
        entity_f1([["O"]], [["O", "O"]])


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Eiffel-Tower!", "eiffeltower"),  # lowercase, punctuation removed (not spaced), article, spaces
        ("An apple, a day.", "apple day"),
        ("The theatre", "theatre"),  # "the" only as a whole word
        ("  Paris\n", "paris"),
    ],
)
def test_squad_normalization(text, normalized):
    assert normalize_answer(text) == normalized


def test_squad_em_f1_max_over_gold_answers():
    # 1) "the Eiffel Tower" vs "Eiffel Tower": equal once normalized -> EM 1, F1 1
    # 2) "in Paris, France" vs "Paris": 1 common token, P 1/3, R 1 -> F1 0.5; EM 0
    # 3) "a big red dog" -> "big red dog": vs "dog" P 1/3 R 1 -> 0.5; vs "big red dogs" 2 common, P = R = 2/3 -> 2/3
    #    max 2/3; EM 0
    # EM = 1/3 = 0.333333; F1 = (1 + 0.5 + 2/3) / 3 = 0.722222
    scores = squad_em_f1(
        ["the Eiffel Tower", "in Paris, France", "a big red dog"],
        [["Eiffel Tower", "Paris"], "Paris", ["dog", "big red dogs"]],
    )
    assert scores == pytest.approx({"exact_match": 0.333333, "f1": 0.722222}, abs=TOL)


def test_cmrc_segmentation_chinese_characters_and_english_words():
    assert cmrc_segments("北京大学 in 2018年") == ["北", "京", "大", "学", "in", "2018", "年"]
    assert cmrc_segments("《红楼梦》，曹雪芹") == ["红", "楼", "梦", "曹", "雪", "芹"]


def test_cmrc_f1_uses_the_longest_contiguous_common_run():
    # "北大京" vs "北京": a bag overlap would be 2 (F1 0.8), the longest common run is 1 character
    # P = 1/3, R = 1/2 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert cmrc_f1("北大京", "北京") == pytest.approx(0.4, abs=TOL)
    # mixed: [apple 公 司] vs [apple 公 司 的]: run 3, P 1, R 3/4 -> F1 = 6/7 = 0.857143
    assert cmrc_f1("Apple公司", "apple 公司 的") == pytest.approx(0.857143, abs=TOL)


def test_cmrc_em_strips_chinese_punctuation_and_case():
    assert cmrc_em("《红楼梦》", "红楼梦") == 1.0
    assert cmrc_em("Hello World", "hello world") == 1.0
    assert cmrc_em("红楼梦.", "红楼梦") == 0.0  # ASCII '.' is not in the official punctuation list


def test_squad_zh_em_f1_averages_best_answers():
    # 1) "位于北京。" -> [位 于 北 京] vs "北京市" -> [北 京 市]: run 2, P 2/4, R 2/3 -> F1 4/7; vs "上海" 0; EM 0
    # 2) "《红楼梦》" vs "红楼梦": EM 1, F1 1
    # EM = 1/2; F1 = (4/7 + 1) / 2 = 11/14 = 0.785714
    scores = squad_zh_em_f1(["位于北京。", "《红楼梦》"], [["北京市", "上海"], "红楼梦"])
    assert scores == pytest.approx({"exact_match": 0.5, "f1": 0.785714}, abs=TOL)


def test_registry_names_and_unknown_name():
    assert set(METRICS) == {
        "perplexity", "rouge", "bleu_nist", "accuracy_macro_f1", "pubmedqa", "seqeval", "squad_em_f1",
        "squad_zh_em_f1", "chrf",
    }  # fmt: skip
    assert get_metric("seqeval") is entity_f1
    with pytest.raises(LoraforgeError, match="known metrics: accuracy_macro_f1, bleu_nist"):
        get_metric("meteor")


@pytest.mark.parametrize("name", ["rouge", "bleu_nist", "squad_em_f1", "squad_zh_em_f1"])
def test_text_metrics_refuse_mismatched_or_blank_references(name):
    with pytest.raises(LoraforgeError, match="2 predictions for 1 references"):
        METRICS[name](["a", "b"], ["a"])
    with pytest.raises(LoraforgeError, match="example 0 has no reference or a blank one"):
        METRICS[name](["a"], [[]])
