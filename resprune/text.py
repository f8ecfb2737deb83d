"""Instruction text -> keywords: answer-format stripping and keyword extraction."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import regex

from .errors import InvalidInputError, MissingDependencyError

__all__ = ["ANSWER_FORMAT_PATTERNS", "STOP_WORDS", "KEYWORD_MODES", "strip_format", "extract_keywords"]

ANSWER_FORMAT_PATTERNS: tuple[str, ...] = (
    r"Answer the question using a single word or phrase\.?",
    r"Answer with the option'?s letter from the given choices directly\.?",
    r"Please answer yes or no\.?",
    r"Answer yes or no\.?",
    r"When the provided information is insufficient, respond with ['\"]?Unanswerable['\"]?\.?",
    r"Reference OCR token:.*$",
    r"Please answer the question and provide the final answer at the end\.?",
    r"Answer the question directly\.?",
    r"<image>",
)
"""Default regular expressions removed (case-insensitively) before keyword extraction:
the answer-format instructions of the common LVLM benchmarks and image placeholders."""

STOP_WORDS: frozenset[str] = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
either else ever every few for from further get gets got had hadn't has hasn't have haven't having he he'd
he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into is isn't it
it's its itself just let's like may me might more most must mustn't my myself neither no nor not of off on
once one only or other ought our ours ourselves out over own please same shall shan't she she'd she'll she's
should shouldn't so some such than that that's the their theirs them themselves then there there's these
they they'd they'll they're they've this those though through to too two under until up upon us very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's whether which while who
who's whom whose why why's will with won't would wouldn't yes yet you you'd you'll you're you've your yours
yourself yourselves
answer question questions describe description tell show shown see seen look looks looking find give
image images picture pictures photo photos photograph shot shows depicted depict depicts visible
option options choice choices following given provided single word phrase letter directly briefly detail
detailed kind type sort many much number thing things something anything
""".split())
"""Built-in English stop words plus instruction words that carry no visual content."""

KEYWORD_MODES = ("content", "nouns", "all")

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")


STRIP_TIMEOUT_S = 1.0
"""Longest a ``strip`` pattern may run on one instruction: a pattern that backtracks
catastrophically (``(a|aa)+$``) is an error, not a selection that hangs."""


def strip_format(text: str, patterns: Sequence[str] = ANSWER_FORMAT_PATTERNS) -> str:
    """Remove every match of ``patterns`` (case-insensitive, multi-line) from ``text``.

    Patterns use Python's ``re`` syntax and run on the ``regex`` engine with a time limit
    (``STRIP_TIMEOUT_S``); a pattern that exceeds it raises ``InvalidInputError``.
    """
    for pattern in patterns:
        try:
            text = _compiled(pattern).sub(" ", text, timeout=STRIP_TIMEOUT_S)
        except TimeoutError:
            raise InvalidInputError(
                f"strip pattern {pattern!r} ran over {STRIP_TIMEOUT_S} s on a {len(text)}-character instruction "
                f"(catastrophic backtracking, e.g. nested or overlapping repeats like (a|aa)+); simplify it.") from None
    return " ".join(text.split())


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern, flags=regex.IGNORECASE | regex.MULTILINE)


def extract_keywords(text: str, mode: str = "content") -> list[str]:
    """Keywords of ``text``, unique, in order of first appearance.

    Modes:
        ``content``: words that are not stop words (built-in list, no model needed);
        ``nouns``: nouns and proper nouns by spaCy's ``en_core_web_sm`` (optional install);
        ``all``: every word.
    """
    if mode == "nouns":
        words = [tok.text for tok in _spacy()(text) if tok.pos_ in ("NOUN", "PROPN")]
    else:
        words = _WORD.findall(text)
        if mode == "content":
            words = [w for w in words if w.lower().strip("'") not in STOP_WORDS]
        elif mode != "all":
            raise InvalidInputError(f"keyword mode {mode!r} is not one of {KEYWORD_MODES}")
    seen: dict[str, str] = {}
    for w in words:
        seen.setdefault(w.lower(), w)
    return list(seen.values())


@functools.lru_cache(maxsize=1)
def _spacy():  # pragma: no cover - needs the optional spaCy model
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["parser", "ner", "lemmatizer"])
    except (ImportError, OSError) as exc:
        raise MissingDependencyError(
            "text_relevance keywords='nouns' needs spaCy and its 'en_core_web_sm' model "
            "(pip install 'resprune[nouns]' and the model); use keywords='content' (the default, "
            f"a built-in stop-word filter) otherwise. Cause: {exc}") from exc
