"""The keyword reward does not pay for keyword stuffing (issue 12), and still pays for coverage.

Before the fix, any key word anywhere in the response counted: naming every colour, shape and
digit scored about 1.0 on any built-in item, as did appending them to a partial description.
"""
import os
import random

import pytest

from pebr import rewards as R
from pebr.data.prompts import format_response
from pebr.data.scenes import COLOURS, SHAPES
from pebr.data.tasks import generate_items

_SEED = int.from_bytes(os.urandom(4), "little")
VOCABULARY = [*COLOURS, *SHAPES, "digit", "digits", "bar", "bars", *map(str, range(10))]


def _items(n=40):
    return generate_items(n, seed=_SEED % 100_000)


def _response(description: str, rationale: str = "Look at the picture.", answer: str = "3") -> str:
    return format_response(description, rationale, ["Read the picture."], answer)


def _stuffing(rng: random.Random) -> str:
    words = list(VOCABULARY)
    rng.shuffle(words)
    return " ".join(words)


def _partial(item) -> str:
    """The reference description with its second half of objects left out."""
    parts = R.extract_description(item.reference_response).rstrip(".").split(", ")
    return ", ".join(parts[: max(1, len(parts) // 2)]) + "."


def test_stuffing_scores_below_a_correct_description():
    rng = random.Random(_SEED)
    stuffed, correct = [], []
    for item in _items():
        correct.append(R.keyword_reward(item.reference_response, item.key_words))
        stuffed.append(R.keyword_reward(_response(_stuffing(rng)), item.key_words))
        assert stuffed[-1] <= correct[-1], (item.key_words, _SEED)
    assert correct == [1.0] * len(correct)
    assert sum(stuffed) / len(stuffed) < 0.5, (sum(stuffed) / len(stuffed), _SEED)  # was about 1.0


def test_stuffing_does_not_raise_a_partial_description():
    rng = random.Random(_SEED)
    for item in _items():
        partial = R.keyword_reward(_response(_partial(item)), item.key_words)
        appended = R.keyword_reward(_response(_partial(item) + " " + _stuffing(rng)), item.key_words)
        assert appended <= partial, (item.key_words, partial, appended, _SEED)


def test_key_words_outside_the_description_give_no_credit():
    rng = random.Random(_SEED)
    for item in _items():
        words = " ".join(item.key_words)
        partial = R.keyword_reward(_response(_partial(item)), item.key_words)
        for elsewhere in (_response(_partial(item), rationale=words), _response(_partial(item), answer=words),
                          _response(_partial(item)) + "\n" + words, words + "\n" + _response(_partial(item)),
                          _response(_partial(item), rationale=_stuffing(rng))):
            assert R.keyword_reward(elsewhere, item.key_words) == partial, (elsewhere, _SEED)
        assert R.keyword_reward(words, item.key_words) == 0.0  # no description section at all


def test_correct_descriptions_score_full_coverage():
    for item in _items():
        assert R.keyword_reward(item.reference_response, item.key_words) == 1.0
    # Other wordings of a correct description; each key word counts once, plurals count.
    key_words = ["red", "circle", "blue", "square", "3"]
    for description in ["Two red circles and a blue square with the digit 3.",
                        "I see a RED CIRCLE; next to it, a blue square showing 3.",
                        "A red circle, a red circle, a red circle, and a blue square (3)."]:
        assert R.keyword_reward(_response(description), key_words) == 1.0, description
    assert R.keyword_reward(_response("a red circle"), ["red", "red", "circle", "blue"]) == pytest.approx(2 / 3)


def test_glued_or_partial_words_give_no_credit():
    key_words = ["red", "blue", "circle", "square"]
    assert R.keyword_reward(_response("redbluecirclesquare"), key_words) == 0.0  # was 1.0
    assert R.keyword_reward(_response("a hundred bluebirds circled squarely"), key_words) == 0.0


def test_long_descriptions_decay():
    item = _items(1)[0]
    description = R.extract_description(item.reference_response)
    repeated = " ".join([description] * 40)  # over 150 words of correct text
    n_words = len(repeated.split())
    assert R.keyword_reward(_response(repeated), item.key_words) == pytest.approx(R.KEYWORD_MAX_WORDS / n_words)
    assert R.keyword_reward(_response(repeated), item.key_words, max_words=None) == 1.0


def test_open_vocabulary_key_words_keep_coverage():
    # Real data: key words outside the built-in vocabulary name only part of the image, so other
    # words cost nothing; only the description section counts.
    key_words = ["cat", "table", "red"]
    assert R.keyword_reward(_response("A red cat sleeps on a blue table near a green plant."), key_words) == 1.0
    assert R.keyword_reward(_response("A cat.", rationale="table red"), key_words) == pytest.approx(1 / 3)
    custom = R.keyword_reward(_response("A red cat on a blue table."), key_words, vocabulary=["blue", "green", "red"])
    assert custom == pytest.approx(2 / 3)  # blue: a listed word that is not a key word cancels one


def test_paper_term_is_available():
    rng = random.Random(_SEED)
    item = _items(1)[0]
    paper = dict(section="response", vocabulary=None, max_words=None)
    stuffed = _response("a picture", rationale=_stuffing(rng))
    assert R.keyword_reward(stuffed, item.key_words, **paper) == 1.0  # what the issue was about
    assert R.keyword_reward(stuffed, item.key_words) == 0.0


@pytest.mark.parametrize("bad", [dict(section="rationales"), dict(max_words=0), dict(vocabulary="all")])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        R.keyword_reward(_response("a red circle"), ["red"], **bad)
