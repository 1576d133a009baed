"""Perception terms of the stage-1 reward that read only the text: key words, length, and the
scene term (the CLIP substitute for built-in items, which have an exact scene)."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from pebr.rewards.sections import ANY_HEADER_RE, RewardFailures, as_text, count_failure, extract_description
from pebr.scenes import COLOURS, SHAPES, Scene

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


def keyword_reward(response: Any, key_words: Any) -> float:
    """Fraction of `key_words` found in the response, case-insensitive (substring, as in the
    paper), except that section headers are not searched and a numeric key word must not be
    part of a longer number.

    key_words: a list of words or one comma-separated string. No key words gives 0.0, as in the
    paper: the term then is the same for every response of the prompt and does not move the
    GRPO advantage.
    """
    text = as_text(response)
    words = _as_keywords(key_words)
    if text is None or not words:
        return 0.0
    # Headers are format, not content: without this, the key word "1" is in every response
    # ("### Step 1:"), and "description" or "answer" would be too.
    lowered = ANY_HEADER_RE.sub(" ", text).lower()
    found = 0
    for w in words:
        w = w.lower()
        if w.isdigit():  # a number must stand alone: "1" is not found in "10" or "2021"
            found += re.search(rf"(?<!\d){re.escape(w)}(?!\d)", lowered) is not None
        else:
            found += w in lowered
    return found / len(words)


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
