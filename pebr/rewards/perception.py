"""Perception terms of the stage-1 reward that read only the text: key words, length, and the
scene term (the CLIP substitute for built-in items, which have an exact scene)."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from pebr.data.scenes import COLOURS, SHAPES, Scene
from pebr.rewards.sections import (
    ANY_HEADER_RE,
    RewardFailures,
    as_text,
    count_failure,
    extract_description,
)

_MAX_PARSE_CHARS = 20_000  # descriptions are parsed for scene_reward up to this length


def _as_keywords(key_words: Any) -> list[str]:
    if key_words is None:
        return []
    if isinstance(key_words, str):
        key_words = key_words.split(",")
    try:
        words = [str(k).strip() for k in key_words]
    except TypeError:
        return []
    return [w for w in words if w]


# Words whose mention costs precision when they are not key words, for key words drawn from the
# built-in scenes' closed vocabulary (colours, shapes, numbers). "digit" and "bar" can be key words
# but cost nothing: honest descriptions say "a circle with the digit 3".
_BUILTIN_KEY_WORDS = frozenset(COLOURS) | frozenset(SHAPES) | {"digit", "bar"}
_BUILTIN_DISTRACTORS = frozenset(COLOURS) | frozenset(SHAPES)
# 5x the longest reference description of the built-in tasks (30 words; 16 on average), and
# longer than a few sentences of real caption; past it the credit decays as max_words / words.
KEYWORD_MAX_WORDS = 150


def _is_builtin_word(word: str, allowed: frozenset) -> bool:
    return word in allowed or (word.isascii() and word.isdigit())


def _distractor_test(key_words: list[str], vocabulary: Any):
    """A function word -> True for the words that cost precision, or None for none."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, str):
        if vocabulary != "auto":
            raise ValueError(f"vocabulary: 'auto', None or a collection of words, got {vocabulary!r}")
        if not all(_is_builtin_word(w, _BUILTIN_KEY_WORDS) for w in key_words):
            return None  # open-vocabulary key words (real data): coverage only
        return lambda w: _is_builtin_word(w, _BUILTIN_DISTRACTORS)
    words = frozenset(str(v).strip().lower() for v in vocabulary)
    return words.__contains__


def _mentions(text: str, word: str) -> bool:
    """`word` in `text` as a whole word (a plural `s`/`es` allowed); a number stands alone."""
    if word.isdigit():  # "1" is not found in "10" or "2021"
        return re.search(rf"(?<!\d){re.escape(word)}(?!\d)", text) is not None
    return re.search(rf"(?<![a-z0-9]){re.escape(word)}(?:e?s)?(?![a-z0-9])", text) is not None


def keyword_reward(
    response: Any,
    key_words: Any,
    *,
    section: str = "description",
    vocabulary: Any = "auto",
    max_words: int | None = KEYWORD_MAX_WORDS,
) -> float:
    """Coverage of `key_words` by the image description, in [0, 1], made so that stuffing does
    not pay: `max(0, found - wrong) / len(key_words)`, times a length decay.

    found: the distinct key words mentioned (case-insensitive, whole words, a plural allowed; a
    numeric key word must not be part of a longer number); section headers are never searched.
    wrong: the distinct `vocabulary` words mentioned that are not key words (each cancels one found
    key word); 0 without a vocabulary. Length decay: `max_words / words` past `max_words` words.

    key_words: a list of words or one comma-separated string. No key words gives 0.0, as in the
        paper: the term then is the same for every response of the prompt and does not move the
        GRPO advantage.
    section: "description" (default): only the text between `### Image Description:` and
        `### Rationales:` (0.0 without it); "response": the whole response, as in the paper.
    vocabulary: the words whose mention costs credit when they are not key words. "auto"
        (default): the built-in scenes' colours, shapes and numbers when every key word is one of
        them or "digit"/"bar" (their key words list every visual word of the scene, so any other
        is a hallucination or a guess), else None. None: nothing costs (key words that name only
        a part of what the image shows, as in real data). Or a collection of words.
    max_words: None for no length decay.

    The paper's term, the fraction of key words found anywhere, is `section="response",
    vocabulary=None, max_words=None` (here with whole words). The default departs from it because
    stage 1 raised that term by keyword stuffing. Measured on 300 built-in items (`generate_items(
    300, seed=11)`), the paper's term: a description of half the objects 0.57, and 1.00 once every
    colour, shape and digit name is appended to it or to the rationales; the names alone as the
    description 0.93. With the defaults: 0.56 (an answer line "3" no longer counts), 0.00
    (appended to the description), 0.56 (to the rationales) and 0.00; the reference descriptions
    still 1.00, and only a complete description without wrong words scores 1.00. Over all 7203
    prefixes of 2000 reference descriptions, appending every name raised the term 15 times (from an
    empty description, by <= 2/11), appending the 6 colours 18% of the times and the 4 shapes 25%
    (mostly right guesses), each lowering it on average (by 0.44, 0.14 and 0.09). `recall x
    precision` instead let the full list raise it on 14% of the non-empty prefixes, by up to 0.30.
    """
    text = as_text(response)
    words = list(dict.fromkeys(w.lower() for w in _as_keywords(key_words)))  # each key word once
    if section not in ("description", "response"):
        raise ValueError(f"section: 'description' or 'response', got {section!r}")
    if max_words is not None and max_words <= 0:
        raise ValueError(f"max_words: must be > 0 or None, got {max_words}")
    if text is None or not words:
        return 0.0
    if section == "description":
        text = extract_description(text)
        if text is None:
            return 0.0
    # Headers are format, not content: without this, the key word "1" is in every response
    # ("### Step 1:"), and "description" or "answer" would be too.
    lowered = ANY_HEADER_RE.sub(" ", text[:_MAX_PARSE_CHARS]).lower()
    found = sum(_mentions(lowered, w) for w in words)
    wrong = 0
    is_distractor = _distractor_test(words, vocabulary)
    if is_distractor is not None and found:
        keys = set(words)
        mentioned = set()
        for tok in re.findall(r"[a-z]+|[0-9]+", lowered):
            for form in (tok, tok[:-1] if tok.endswith("s") else None, tok[:-2] if tok.endswith("es") else None):
                if form and (form in keys or is_distractor(form)):
                    mentioned.add(form)
                    break
        wrong = len(mentioned - keys)
    score = max(0, found - wrong) / len(words)
    if max_words is not None:
        n_words = len(text.split())
        if n_words > max_words:
            score *= max_words / n_words
    return float(score)


def length_reward(num_tokens: Any, expected: int = 512) -> float:
    """1.0 if `num_tokens <= expected`, else `expected / num_tokens`; 0.0 for a non-number."""
    if expected <= 0:
        raise ValueError(f"expected: must be > 0, got {expected}")
    try:
        n = float(num_tokens)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(n) or n < 0:
        return 0.0
    return 1.0 if n <= expected else float(expected) / n


_NOUNS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
_NOUNS |= {"bar": "bar", "bars": "bar", "digit": "digit", "digits": "digit", "number": "digit", "numbers": "digit"}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


def _scene_facts(scene: Scene) -> tuple[Counter, Counter]:
    if scene.kind == "bars":
        return Counter((b.colour, "bar") for b in scene.bars), Counter(str(b.value) for b in scene.bars)
    return Counter((o.colour, o.noun) for o in scene.objects), Counter(str(d) for d in scene.digits)


def _mentioned_facts(text: str) -> tuple[Counter, Counter]:
    """(colour, noun) pairs and single-digit numbers mentioned in `text`.

    `two red circles` counts twice; `a green 7` is a green digit; a colour binds the first noun
    within the next two words (`red bar`, `blue filled square`).
    """
    tokens = re.findall(r"[a-z]+|\d+", text[:_MAX_PARSE_CHARS].lower())
    pairs: Counter = Counter()
    for i, tok in enumerate(tokens):
        if tok not in COLOURS:
            continue
        noun = None
        for nxt in tokens[i + 1: i + 3]:
            if nxt in _NOUNS:
                noun = _NOUNS[nxt]
                break
            if nxt.isdigit():
                noun = "digit" if len(nxt) == 1 else None
                break
        if noun is None:
            continue
        prev = tokens[i - 1] if i > 0 else ""
        # Only number words multiply: a digit before a colour is usually the previous
        # object's value (`red bar of 9, blue bar of 8`).
        times = _NUMBER_WORDS.get(prev, 1)
        pairs[(tok, noun)] += times
    numbers = Counter(t for t in tokens if t.isdigit() and len(t) == 1)
    return pairs, numbers


def _f1(found: Counter, truth: Counter) -> float:
    hits = sum((found & truth).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(found.values()), hits / sum(truth.values())
    return 2 * precision * recall / (precision + recall)


def scene_reward(response: Any, scene: Scene | dict | None, *, failures: RewardFailures | None = None) -> float:
    """How well the image description matches a built-in scene, in [0, 1].

    F1 (precision and recall, as multisets) of the coloured objects it names (`red circle`,
    `green digit`, `blue bar`) against the scene's objects; for scenes with digits or bar values,
    averaged with the F1 of the single digits it mentions. Naming every colour and shape costs
    precision, so hedging does not pay. 0.0 without a description section or a valid scene.
    """
    if isinstance(scene, dict):
        try:
            scene = Scene.from_dict(scene)
        except (TypeError, ValueError):
            return 0.0
    if not isinstance(scene, Scene):
        return 0.0
    description = extract_description(response)
    if description is None:
        count_failure(failures, "not_text" if as_text(response) is None else "no_description")
        return 0.0
    truth_pairs, truth_numbers = _scene_facts(scene)
    pairs, numbers = _mentioned_facts(description)
    score = _f1(pairs, truth_pairs) if truth_pairs else 0.0
    if truth_numbers:
        score = 0.5 * (score + _f1(numbers, truth_numbers))
    return float(min(1.0, max(0.0, score)))
