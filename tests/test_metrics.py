"""evaluate.py metrics: SPEC section 3's worked values, and NLTK as the reference for BLEU-1."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from evaluate import bleu1, evidence_recall, exact_match, f1, treebank_tokenize

WORKED = [  # (prediction, gold, F1, BLEU-1) from SPEC section 3
    ("May 7, 2023", "7 May 2023", 1.0, 0.75),
    ("She went on 7 May 2023.", "7 May 2023", 0.6667, 0.4286),
    ("the adoption agencies", "Adoption agencies", 0.8, 0.6667),
]


@pytest.mark.parametrize("pred,gold,want_f1,want_bleu", WORKED)
def test_spec_worked_values(pred, gold, want_f1, want_bleu):
    assert f1(pred, gold) == pytest.approx(want_f1, abs=1e-4)
    assert bleu1(pred, gold) == pytest.approx(want_bleu, abs=1e-4)


def test_exact_match_squad_normalisation():
    assert exact_match("The Beach!", "beach") == 1.0
    assert exact_match("  an  apple pie. ", "Apple pie") == 1.0
    assert exact_match("7 May 2023", "May 7, 2023") == 0.0
    assert exact_match(2022, "2022") == 1.0


def test_f1_edge_cases():
    assert f1("", "beach") == 0.0 and f1("beach", " ") == 0.0
    assert f1("beach beach beach", "beach") == 1.0  # sets, not multisets (Mem0)
    assert f1(2022, 2022) == 1.0
    assert f1("...", "beach") == 0.0


CORPUS = [
    "May 7, 2023", "She went on 7 May 2023.", "I can't believe it's \"real\" -- wow!", "(a) [b] {c} <d>",
    "Caroline's dogs' toys", "cannot gonna wanna go", "Mr. Smith paid $5.50 at 3:30pm; then left...",
    "'Tis the season, isn't it?", "“Quoted” and ‘single’ «guillemets»", "e-mail me @ home #1 & 100%",
    "They'll say we've done it, I'd think.", "end with quote.'", "ok... fine", "",
]


@pytest.mark.parametrize("text", CORPUS)
def test_treebank_tokenizer_equals_nltk(text):
    assert treebank_tokenize(text.lower()) == NLTKWordTokenizer().tokenize(text.lower())


def nltk_bleu1(pred, gold):
    hyp = NLTKWordTokenizer().tokenize(str(pred).lower())
    ref = NLTKWordTokenizer().tokenize(str(gold).lower())
    return sentence_bleu([ref], hyp, weights=(1, 0, 0, 0), smoothing_function=SmoothingFunction().method1)


@pytest.mark.parametrize("pred", CORPUS)
def test_bleu1_equals_nltk_on_corpus(pred):
    for gold in ["7 May 2023", "She can't go.", "adoption agencies"]:
        assert bleu1(pred, gold) == pytest.approx(nltk_bleu1(pred, gold), abs=1e-9)


words = st.sampled_from(["may", "7", "2023", "the", "beach", "dog", ",", ".", "can't", "'s", '"', "(", "--",
                         "she", "went", "!", "...", "$", "it's", "go", "@"])
phrases = st.lists(words, min_size=0, max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(phrases, phrases)
def test_bleu1_equals_nltk_property(pred, gold):
    assert bleu1(pred, gold) == pytest.approx(nltk_bleu1(pred, gold), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=40))
def test_treebank_tokenizer_property(text):
    assert treebank_tokenize(text) == NLTKWordTokenizer().tokenize(text)


def test_evidence_recall():
    retrieved = [{"dia_ids": ["D1:3"]}, {"dia_ids": ["D2:1", "D2:2"]}, {"dia_ids": []}]
    assert evidence_recall(["D1:3", "D2:2", "D9:9", "D4:1"], retrieved) == 0.5
    assert evidence_recall([], retrieved) is None
