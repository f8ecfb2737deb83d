"""Instruction text: answer-format stripping, keywords, and the text_relevance scorer (Eq. 13)."""

from __future__ import annotations

import hashlib
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resprune
from resprune.testing import random_context
from resprune.text import ANSWER_FORMAT_PATTERNS, STOP_WORDS, extract_keywords, strip_format

# --- answer-format stripping ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("What is the color of the bus? Answer the question using a single word or phrase.",
     "What is the color of the bus?"),
    ("What is the color of the bus?\nAnswer the question using a single word or phrase",
     "What is the color of the bus?"),
    ("Which animal is it?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly.",
     "Which animal is it? A. cat B. dog"),
    ("Answer with the options letter from the given choices directly. Pick one", "Pick one"),
    ("<image>\nIs there a dog in the picture? Please answer yes or no.", "Is there a dog in the picture?"),
    ("Is it raining? Answer yes or no.", "Is it raining?"),
    ("Where is the key? When the provided information is insufficient, respond with 'Unanswerable'.",
     "Where is the key?"),
    ('Where? When the provided information is insufficient, respond with "Unanswerable".', "Where?"),
    ("What does the sign say? Reference OCR token: STOP, Main, St\nThanks", "What does the sign say? Thanks"),
    ("Solve it. Please answer the question and provide the final answer at the end.", "Solve it."),
    ("Who is this? Answer the question directly.", "Who is this?"),
    ("ANSWER THE QUESTION USING A SINGLE WORD OR PHRASE. red car", "red car"),
    ("  a   <IMAGE>  b  ", "a b"),
    ("Describe the scene in detail.", "Describe the scene in detail."),
])
def test_strip_format(text, expected):
    assert strip_format(text) == expected


def test_strip_format_with_custom_or_no_patterns():
    text = "Count the birds.  Reply in digits."
    assert strip_format(text, [r"Reply in digits\.?"]) == "Count the birds."
    assert strip_format(text, []) == "Count the birds. Reply in digits."
    assert strip_format(text, ()) == " ".join(text.split())


def test_default_patterns_are_valid_regexes_and_every_one_is_used():
    import re

    for pattern in ANSWER_FORMAT_PATTERNS:
        re.compile(pattern)
    samples = [
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Please answer yes or no.", "Answer yes or no.",
        "When the provided information is insufficient, respond with Unanswerable.",
        "Reference OCR token: A, B",
        "Please answer the question and provide the final answer at the end.",
        "Answer the question directly.", "<image>",
    ]
    for sample in samples:
        assert strip_format(f"Keep this. {sample}") == "Keep this.", sample


# --- keywords ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("What is the color of the bus?", ["color", "bus"]),
    ("Is there a dog?", ["dog"]),
    ("Where is it?", []),
    ("", []),
    ("The Cat and the cat sat on a Mat; CAT!", ["Cat", "sat", "Mat"]),
    ("Don't you see the man's red-and-white umbrella?", ["man's", "red-and-white", "umbrella"]),
    ("How many people are in the image? Describe the picture.", ["people"]),
    ("What is written on the 2nd sign from the left?", ["written", "2nd", "sign", "left"]),
])
def test_content_keywords(text, expected):
    assert extract_keywords(text) == expected
    assert extract_keywords(text, "content") == expected


def test_all_keywords_keeps_stop_words_deduplicated_in_order():
    assert extract_keywords("What is the color of the bus? THE bus!", "all") == [
        "What", "is", "the", "color", "of", "bus"]


def test_stop_words_are_lowercase_and_include_instruction_words():
    assert all(w == w.lower() for w in STOP_WORDS)
    assert {"the", "what", "is", "image", "picture", "answer", "question", "describe"} <= STOP_WORDS
    assert not {"cat", "dog", "red", "sign", "car"} & STOP_WORDS


VOCAB = sorted(STOP_WORDS)[:60] + ["cat", "Dog", "sign", "red", "car", "Tower", "x1", "blue-green"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=15), st.sampled_from([" ", ", ", "? ", "\n"]))
def test_content_keywords_match_a_plain_filter(words, sep):
    text = sep.join(words)
    expected, seen = [], set()
    for w in words:
        if w.lower() not in STOP_WORDS and w.lower() not in seen:
            seen.add(w.lower())
            expected.append(w)
    assert extract_keywords(text, "content") == expected
    everything, seen = [], set()
    for w in words:
        if w.lower() not in seen:
            seen.add(w.lower())
            everything.append(w)
    assert extract_keywords(text, "all") == everything


def test_unknown_keyword_mode_is_rejected():
    with pytest.raises(ValueError, match="keyword mode 'verbs' is not one of"):
        extract_keywords("a cat", "verbs")
    with pytest.raises(resprune.ConfigError, match="keywords='verbs' is not one of 'content', 'nouns', 'all'"):
        resprune.score(torch.randn(4, 3), "text_relevance", keywords="verbs")


def test_unknown_keyword_mode_is_a_resprune_error():
    with pytest.raises(ValueError) as info:
        extract_keywords("a cat", "verbs")
    assert isinstance(info.value, resprune.ResPruneError)


@pytest.fixture
def without_spacy(monkeypatch):
    """Make ``import spacy`` fail as if it were not installed."""
    import resprune.text as text

    monkeypatch.setitem(sys.modules, "spacy", None)
    text._spacy.cache_clear()
    yield
    text._spacy.cache_clear()


def test_nouns_mode_without_spacy_names_the_install(without_spacy):
    with pytest.raises(resprune.MissingDependencyError) as info:
        extract_keywords("What is the cat doing on the roof?", "nouns")
    message = str(info.value)
    assert "spaCy" in message and "en_core_web_sm" in message
    assert "pip install 'resprune[nouns]'" in message and "keywords='content'" in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, resprune.ResPruneError)
    # the scorer accepts the option (it validates) and fails only when it runs
    ctx = random_context(b=1, d=4)
    with pytest.raises(resprune.MissingDependencyError, match="resprune\\[nouns\\]"):
        resprune.score(ctx.tokens, "text_relevance", keywords="nouns", context=ctx)


def test_nouns_mode_with_spacy():
    spacy = pytest.importorskip("spacy")
    try:
        spacy.load("en_core_web_sm")
    except OSError:
        pytest.skip("spaCy's en_core_web_sm model is not installed")
    words = extract_keywords("What is the cat doing on the roof of the red house?", "nouns")
    assert {"cat", "roof", "house"} <= {w.lower() for w in words}
    assert not {"what", "is", "the", "red", "doing"} & {w.lower() for w in words}


# --- text_relevance: Eq. 13 against loops -----------------------------------------------------------


def varying_embedder(d, calls=None):
    """Deterministic 'embedding table': 1 to 3 sub-words per word, depending on the word."""

    def embed(word):
        if calls is not None:
            calls.append(word)
        digest = hashlib.sha256(word.encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
        return torch.randn(1 + digest[4] % 3, d, generator=gen, dtype=torch.float64).float()

    return embed


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def reference_relevance(tokens, keywords, embed, reduce):
    """Straight from the definitions, one token and one keyword sub-word at a time, in float64."""
    u = [row for w in keywords for row in embed(w).double().tolist()]
    out = []
    for v in tokens.double().tolist():
        if not u:
            out.append(1.0)
        elif reduce == "max":  # Eq. 13: r_i = max_j max(0, cos(v_i, u_j))
            out.append(max(max(0.0, cos(v, uj)) for uj in u))
        elif reduce == "mean":  # mean over the keyword tokens of max(0, cos)
            out.append(sum(max(0.0, cos(v, uj)) for uj in u) / len(u))
        elif reduce == "pooled":  # cos to the mean keyword-token embedding
            pooled = [sum(col) / len(u) for col in zip(*u)]
            out.append(max(0.0, cos(v, pooled)))
    return torch.tensor(out, dtype=torch.float64)


TEXTS = [
    "What colour is the cat on the sofa? Answer the question using a single word or phrase.",
    "<image>\nIs the red car parked near the tower? Please answer yes or no.",
]
KEYWORDS = [["colour", "cat", "sofa"], ["red", "car", "parked", "near", "tower"]]


@pytest.mark.parametrize("reduce", ["max", "mean", "pooled"])
@pytest.mark.parametrize("seed", [0, 1])
def test_text_relevance_matches_the_loop_reference(reduce, seed):
    d = 6
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 9, d, generator=gen)
    # make some tokens point along a keyword sub-word, so the relevance spans (0, 1]
    embed = varying_embedder(d)
    tokens[0, 0] = 3.0 * embed("cat")[0]
    tokens[1, 4] = 0.5 * embed("tower")[-1]
    calls = []
    r = resprune.score(tokens, "text_relevance", reduce=reduce,
                       context={"text": TEXTS, "text_embedder": varying_embedder(d, calls)})
    assert r.shape == (2, 9) and r.dtype == torch.float32
    assert calls == KEYWORDS[0] + KEYWORDS[1]
    for b in range(2):
        expected = reference_relevance(tokens[b], KEYWORDS[b], embed, reduce)
        torch.testing.assert_close(r[b].double(), expected, rtol=1e-5, atol=1e-6)
    assert bool((r >= 0).all()) and bool((r <= 1 + 1e-6).all())
    if reduce == "max":
        assert r[0, 0] == pytest.approx(1.0, abs=1e-6) and r[1, 4] == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1),
       st.sampled_from(["max", "mean", "pooled"]))
def test_text_relevance_is_in_unit_interval(b, n, d, seed, reduce):
    tokens = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))
    r = resprune.score(tokens, "text_relevance", reduce=reduce,
                       context={"text": "a red car near the old tower", "text_embedder": varying_embedder(d)})
    assert r.shape == (b, n)
    assert bool(torch.isfinite(r).all()) and bool((r >= 0).all()) and bool((r <= 1 + 1e-6).all())
    words = ["red", "car", "near", "old", "tower"]
    for i in range(b):
        torch.testing.assert_close(r[i].double(), reference_relevance(tokens[i], words, varying_embedder(d), reduce),
                                   rtol=1e-5, atol=1e-6)


def test_text_relevance_with_no_keywords_is_uniform():
    tokens = torch.randn(2, 5, 4)
    calls = []
    r = resprune.score(tokens, "text_relevance",
                       context={"text": ["Where is it? Answer yes or no.", "<image>"],
                                "text_embedder": varying_embedder(4, calls)})
    assert torch.equal(r, torch.ones(2, 5)) and calls == []


def test_text_relevance_params_change_the_keywords():
    scorer_cls = resprune.get_host().scorers.get("text_relevance")
    text = "What is the cat eating? Answer the question using a single word or phrase."
    assert scorer_cls().keywords(text) == ["cat", "eating"]
    # without stripping, the format sentence leaks 'using' (its other words are stop words)
    assert scorer_cls(strip=[]).keywords(text) == ["cat", "eating", "using"]
    assert scorer_cls(keywords="all").keywords(text) == ["What", "is", "the", "cat", "eating"]
    assert scorer_cls(keywords="all", strip=[]).keywords(text) == [
        "What", "is", "the", "cat", "eating", "Answer", "question", "using", "a", "single", "word", "or", "phrase"]
    # and the score follows the keywords: 'all' embeds more words than 'content'
    tokens = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    calls = []
    resprune.score(tokens, "text_relevance", keywords="all", strip=[],
                   context={"text": text, "text_embedder": varying_embedder(4, calls)})
    assert calls == scorer_cls(keywords="all", strip=[]).keywords(text)


def test_text_relevance_single_string_applies_to_every_image():
    tokens = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    ctx = {"text": "a green apple", "text_embedder": varying_embedder(5)}
    r = resprune.score(tokens, "text_relevance", context=ctx)
    for i in range(3):
        torch.testing.assert_close(r[i].double(), reference_relevance(tokens[i], ["green", "apple"],
                                                                       varying_embedder(5), "max"),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("embedder", "hint"), [
    (lambda w: torch.randn(2, 7), "returned (2, 7); expected [L, d] with d=5"),
    (lambda w: torch.randn(5), "returned (5,)"),
    (lambda w: [[0.0] * 5], "returned list"),
])
def test_text_embedder_of_the_wrong_shape(embedder, hint):
    with pytest.raises(resprune.InvalidInputError) as info:
        resprune.score(torch.randn(4, 5), "text_relevance", context={"text": "a cat", "text_embedder": embedder})
    assert "text_embedder('cat')" in str(info.value) and hint in str(info.value)


def test_text_relevance_with_the_random_context():
    ctx = random_context(b=2, rows=3, cols=4, d=8)
    r = resprune.score(ctx.tokens, "text_relevance", context=ctx)
    embed = ctx.get("text_embedder")
    for b, text in enumerate(ctx.get("text")):
        words = extract_keywords(strip_format(text))
        assert words and words[0] == "colour"
        torch.testing.assert_close(r[b].double(), reference_relevance(ctx.tokens[b], words, embed, "max"),
                                   rtol=1e-5, atol=1e-6)
