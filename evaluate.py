"""Evaluation of Memory-R1 on LoCoMo: the paper's metrics (SPEC section 3).

This file so far holds the metrics; the end-to-end `python evaluate.py` (banks, answers, report) follows.

    exact_match(pred, gold)   SQuAD normalisation, the RL reward (SPEC section 1)
    f1(pred, gold)            Mem0's token-set F1, the F1 of the paper's tables
    bleu1(pred, gold)         NLTK sentence_bleu, weights (1,0,0,0), smoothing method1, Treebank tokens
    evidence_recall(...)      how many of a question's evidence turns reached the retrieved memories
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

# --------------------------------------------------------------------------------------------------
# Exact match and Mem0's F1
# --------------------------------------------------------------------------------------------------


def normalise_squad(text) -> str:
    """Lowercase, strip punctuation, drop a/an/the, collapse whitespace (SQuAD's normalisation)."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred, gold) -> float:
    return float(normalise_squad(pred) == normalise_squad(gold))


def mem0_tokens(text) -> set[str]:
    """Mem0's tokens: lowercase, `. , ! ?` become spaces, split on whitespace; a set."""
    return set(re.sub(r"[.,!?]", " ", str(text).lower()).split())


def f1(pred, gold) -> float:
    """Mem0's token-set F1 (SPEC section 3): overlap of token sets; empty prediction or gold -> 0."""
    if not str(pred).strip() or not str(gold).strip():
        return 0.0
    p, g = mem0_tokens(pred), mem0_tokens(gold)
    common = len(p & g)
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------
# BLEU-1 on Penn-Treebank word tokens
# --------------------------------------------------------------------------------------------------

# The rules of NLTK's NLTKWordTokenizer (an improved Penn-Treebank tokenizer; as of nltk 3.10), in its
# order: (pattern, replacement) applied with re.sub; the text is finally split on whitespace.
_STARTING_QUOTES = [
    (r"([«“‘„]|[`]+)", r" \1 "),
    (r'^"', r"``"),
    (r"(``)", r" \1 "),
    (r'([ \(\[{<])("|\'{2})', r"\1 `` "),
    (r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),  # an opening single quote
]
_ENDING_QUOTES = [
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
]
_PUNCTUATION = [
    (r'([^\.])(\.)([\]\)}>"\'»”’ ]*+)\s*$', r"\1 \2 \3 "),  # the final period, before closing quotes
    (r"([:,])([^\d])", r" \1 \2"),  # commas and colons, but not inside numbers
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),  # ellipsis
    (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "),  # figure, en and em dashes, horizontal bar
    (r'([^\.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
]
_PARENS = [(r"[\]\[\(\)\{\}\<\>]", r" \g<0> ")]
_DOUBLE_DASHES = [(r"--", r" -- ")]
_CONTRACTIONS = [(rf"(?i)\b({a})({b})\b", r" \1 \2 ") for a, b in
                 [("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"),
                  ("more", "'n")]] + \
                [(r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "), (r"(?i) ('t)(is)\b", r" \1 \2 "),
                 (r"(?i) ('t)(was)\b", r" \1 \2 ")]


def treebank_tokenize(text: str) -> list[str]:
    """Penn-Treebank word tokens, as NLTK's NLTKWordTokenizer splits one sentence."""
    for rules in (_STARTING_QUOTES, _PUNCTUATION, _PARENS, _DOUBLE_DASHES):
        for pattern, repl in rules:
            text = re.sub(pattern, repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_QUOTES + _CONTRACTIONS:
        text = re.sub(pattern, repl, text)
    return text.split()


def bleu1(pred, gold) -> float:
    """Clipped unigram precision x brevity penalty on Treebank tokens of the lowercased strings.

    Equal to NLTK's sentence_bleu([gold], pred, weights=(1, 0, 0, 0), smoothing_function=method1): with
    weight 0 on 2-4-grams their (smoothed) precisions do not count, and no unigram match gives 0.
    """
    hyp, ref = treebank_tokenize(str(pred).lower()), treebank_tokenize(str(gold).lower())
    if not hyp:
        return 0.0
    ref_counts = Counter(ref)
    matches = sum(min(n, ref_counts[w]) for w, n in Counter(hyp).items())
    if matches == 0:
        return 0.0
    c, r = len(hyp), len(ref)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * matches / c


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def evidence_recall(evidence: list[str], retrieved: list[dict]) -> float | None:
    """Fraction of a question's evidence turns (dia_ids) that some retrieved memory came from.

    Low recall means the memory lost the fact (not the answerer); None when a question has no evidence.
    """
    if not evidence:
        return None
    found = {d for m in retrieved for d in m.get("dia_ids", [])}
    return sum(e in found for e in evidence) / len(evidence)
