"""Per-answer metrics on small texts with known scores (real libraries, real embedding model)."""

import pytest

from costeer.evaluation.metrics import Scorer, distinct_n, meteor_synonyms, quality_metrics, words
from support.workers import TORCH_WORKER

pytestmark = TORCH_WORKER  # the embedding model


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer()


def test_rouge_uses_the_stemmer(scorer):
    s = scorer.score("The cats were running", "the cat was running")
    # stemmed: the cat were run / the cat wa run -> 3 of 4 unigrams shared
    assert s["rouge1"] == pytest.approx(0.75)
    assert scorer.score("a b c d", "a b c d")["rougeL"] == pytest.approx(1.0)
    assert scorer.score("x y", "a b")["rouge1"] == 0.0


def test_meteor_matches_exact_words_and_stems_and_orders_answers(scorer):
    reference = "The quick brown fox jumps over the lazy dog"
    assert scorer.meteor(reference, reference) > 0.99
    assert scorer.meteor("The quick brown foxes jumped over the lazy dogs", reference) > 0.9  # stems match
    assert scorer.meteor("A quick fox", reference) < scorer.meteor("The quick brown fox jumps", reference)
    assert scorer.meteor("completely unrelated words", reference) == 0.0


def test_meteor_without_wordnet_gives_no_synonym_credit(scorer):
    if meteor_synonyms():
        pytest.skip("nltk's WordNet data is installed here")
    # 'big' / 'large' are WordNet synonyms: with WordNet they would match
    assert scorer.meteor("large", "big") == 0.0


def test_semantic_similarity_ranks_paraphrases_above_unrelated_text(scorer):
    reference = "The cat sat on the mat."
    paraphrase = scorer.semantic("A feline was resting on the rug.", reference)
    unrelated = scorer.semantic("Quarterly revenue grew by four percent.", reference)
    assert scorer.semantic(reference, reference) == pytest.approx(1.0, abs=1e-4)
    assert paraphrase > unrelated + 0.3


def test_preference_metrics(scorer):
    assert words("Don't stop, it's fine!") == ["don't", "stop", "it's", "fine"]
    assert distinct_n(["a", "b", "a", "b"], 1) == 0.5
    assert distinct_n(["a", "b", "a", "b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a"], 2) == 0.0
    happy = scorer.score("What a wonderful, joyful day! I love it.", None)
    sad = scorer.score("This is a terrible, awful, sad day.", None)
    assert happy["sentiment"] > 0.5 and sad["sentiment"] < -0.5
    assert happy["words"] == 8 and "rouge1" not in happy  # no reference, no reference metrics


def test_each_preference_is_judged_in_its_direction():
    assert quality_metrics("concise")[0].key == "words" and not quality_metrics("concise")[0].higher_is_better
    assert quality_metrics("verbose")[0].higher_is_better
    assert quality_metrics("uplifting")[0].key == "sentiment"
    assert [m.key for m in quality_metrics("creative")] == ["rare_words", "distinct2"]
    assert [m.key for m in quality_metrics(None)] == ["rougeL", "rouge1", "meteor", "semantic"]


def test_rare_words_count_what_english_seldom_says_and_old_rows_get_them():
    from costeer.evaluation.metrics import backfill, rare_word_share

    assert rare_word_share("the cat and the dog") == 0.0
    assert rare_word_share("the glacier shimmered, iridescent and fathomless") == pytest.approx(4 / 6)
    assert rare_word_share("") == 0.0 and rare_word_share("42 17") == 0.0  # no alphabetic word
    assert Scorer().score("A luminous nebula.", None)["rare_words"] == pytest.approx(2 / 3)
    old = [{"text": "iridescent dog"}, {"text": "dog", "rare_words": 0.5}, {"correct": 1.0}]
    assert backfill(old) == [{"text": "iridescent dog", "rare_words": 0.5}, old[1], old[2]]
