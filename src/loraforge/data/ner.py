"""NER tags <-> entity spans <-> the entity list a model learns to write.

Tag schemes (`O`, `B-TYPE`, `I-TYPE` in both):
- IOB1 (CoNLL-2003 as released): an entity starts with `I-`; `B-` only starts an entity right after one of the same
  type (`I-ORG B-ORG` = two organisations side by side).
- BIO, also called IOB2 (what seqeval and most modern code expect): every entity starts with `B-`.

Both read into the same spans with one rule: an `I-X` continues an entity only right after `B-X`/`I-X`, and starts
a new one otherwise (conlleval's rule), so IOB1 -> BIO is `spans_to_bio(tag_spans(tags))`, and data in either scheme
needs no option. (The rule reads every sequence of one scheme as that scheme means it, and the rare slip too:
eng.train has two IOB1 sentences with a `B-MISC` right after `O`, read as the start of an entity, as conlleval does.)

The target text lists the entities in sentence order, `EU: ORG; German: MISC; British: MISC` ("none" if there
are none): short, in the words of the sentence, and it parses back to one BIO tag per token by finding each entity's
words in the sentence, left to right.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

NO_ENTITIES = "none"

Span = tuple[int, int, str]
"""(first token, one past the last token, type)."""


def tag_spans(tags: Sequence[str]) -> list[Span]:
    """The entities of a tag sequence in IOB1 or BIO (tags are assumed well-formed, see `tag_problem`)."""
    spans: list[Span] = []
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and t == kind and start >= 0
        if start >= 0 and not continues:
            spans.append((start, i, kind))
            start, kind = -1, ""
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return spans


def spans_to_bio(spans: Sequence[Span], n_tokens: int) -> list[str]:
    """BIO tags for `n_tokens` tokens with `spans` marked."""
    tags = ["O"] * n_tokens
    for start, end, kind in spans:
        tags[start:end] = [f"B-{kind}"] + [f"I-{kind}"] * (end - start - 1)
    return tags


def iob1_to_bio(tags: Sequence[str]) -> list[str]:
    """Convert IOB1 tags (CoNLL-2003's) to BIO: every entity's first tag becomes `B-`."""
    return spans_to_bio(tag_spans(tags), len(tags))


def tag_problem(tags: Sequence[str], types: Sequence[str]) -> str | None:
    """What is wrong with `tags`, or None: a tag that is not O, B-TYPE or I-TYPE with TYPE one of `types`."""
    for i, tag in enumerate(tags):
        prefix, _, kind = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not kind):
            return f'tag {i} is "{tag}", not O, B-TYPE or I-TYPE'
        if tag != "O" and kind not in types:
            return f'tag {i} is "{tag}", a type not in {", ".join(types)}'
    return None


def render_entities(tokens: Sequence[str], spans: Sequence[Span]) -> str:
    """`EU: ORG; German: MISC`, the entities in sentence order, or "none"."""
    if not spans:
        return NO_ENTITIES
    return "; ".join(f"{' '.join(tokens[s:e])}: {kind}" for s, e, kind in sorted(spans))


def parse_entities(text: str, tokens: Sequence[str], types: Sequence[str]) -> list[str]:
    """Turn a generated entity list back into one BIO tag per token of the sentence.

    Each `words: TYPE` item (TYPE one of `types`; anything else is ignored) is looked for in the sentence from
    just after the previous match, then from the start; words not found, or already tagged, are dropped. So a
    well-formed answer maps back exactly, and a sloppy one scores what it got right.
    """
    kinds = "|".join(re.escape(t) for t in sorted(types, key=len, reverse=True))
    item = re.compile(rf"\s*(.+?)\s*:\s*({kinds})\s*(?:;|\n|$)")
    taken = [False] * len(tokens)
    spans: list[Span] = []
    cursor = 0
    for match in item.finditer(text.strip()):
        words = match.group(1).split()
        start = _find(words, tokens, taken, cursor)
        if start is None:
            start = _find(words, tokens, taken, 0)
        if start is None:
            continue
        end = start + len(words)
        taken[start:end] = [True] * len(words)
        spans.append((start, end, match.group(2)))
        cursor = end
    return spans_to_bio(spans, len(tokens))


def entities_parse(text: str, tokens: Sequence[str], types: Sequence[str]) -> bool:
    """True when `text` is a well-formed entity list for this sentence: "none", or `words: TYPE` items separated by
    ";", each TYPE one of `types` and each item's words found in the sentence, in order, without overlap. What
    `parse_entities` reads exactly; a sloppy answer (a stray phrase, an unknown type, words not in the sentence)
    is scored by `parse_entities` for what it got right but does not parse here."""
    text = text.strip()
    if text == NO_ENTITIES:
        return True
    kinds = "|".join(re.escape(t) for t in sorted(types, key=len, reverse=True))
    item = re.compile(rf"(.+?)\s*:\s*({kinds})")
    taken = [False] * len(tokens)
    cursor = 0
    for part in text.split(";"):
        match = item.fullmatch(part.strip())
        if match is None:
            return False
        words = match.group(1).split()
        start = _find(words, tokens, taken, cursor)
        if start is None:
            start = _find(words, tokens, taken, 0)
        if start is None:
            return False
        taken[start:start + len(words)] = [True] * len(words)
        cursor = start + len(words)
    return True


def _find(words: list[str], tokens: Sequence[str], taken: list[bool], start: int) -> int | None:
    n = len(words)
    for i in range(start, len(tokens) - n + 1):
        if list(tokens[i:i + n]) == words and not any(taken[i:i + n]):
            return i
    return None
