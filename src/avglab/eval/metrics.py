"""Answer normalisation and exact match (GQA-style: lowercase, no punctuation, no articles)."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercases, drops punctuation and articles, folds white space."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> bool:
    """True when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(ref) for ref in references)
