"""The rewards of the two RL stages: perception (stage 1) and reasoning (stage 2)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pebr.rewards.answer import accuracy_reward
from pebr.rewards.clip import ClipScorer, clip_reward
from pebr.rewards.perception import keyword_reward, length_reward, scene_reward
from pebr.rewards.sections import RewardFailures, as_text, count_failure, format_reward


@dataclass
class PerceptionWeights:
    """Stage-1 weights (paper: 0.4 clip, 0.4 keyword, 0.1 format, 0.1 length)."""

    clip: float = 0.4  # also the weight of the scene term when it stands in for CLIP
    keyword: float = 0.4
    format: float = 0.1
    length: float = 0.1
    expected_length: int = 512  # tokens; longer responses get expected/len on the length term

    def __post_init__(self):
        _check_weights(self, ("clip", "keyword", "format", "length"))
        if self.expected_length <= 0:
            raise ValueError(f"expected_length: must be > 0, got {self.expected_length}")


@dataclass
class ReasoningWeights:
    """Stage-2 weights (paper: 0.9 accuracy, 0.1 format)."""

    accuracy: float = 0.9
    format: float = 0.1

    def __post_init__(self):
        _check_weights(self, ("accuracy", "format"))


def _check_weights(w, names) -> None:
    for name in names:
        v = getattr(w, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: a weight must be a finite number >= 0, got {v!r}")
    if sum(getattr(w, n) for n in names) <= 0:
        raise ValueError(f"weights: at least one of {names} must be > 0")


def visual_term(item: Any, scorer: ClipScorer | None) -> str | None:
    """Which visual term the perception reward uses for `item`: "clip" (a scorer is given),
    "scene" (a built-in item with a scene), or None (neither; the term is left out)."""
    if scorer is not None:
        return "clip"
    return "scene" if getattr(item, "scene", None) else None


def perception_reward(
    response: Any,
    item: Any,
    *,
    num_tokens: int,
    weights: PerceptionWeights = PerceptionWeights(),
    scorer: ClipScorer | None = None,
    failures: RewardFailures | None = None,
) -> dict[str, float]:
    """Stage-1 reward of one response: {"overall", "clip" or "scene", "keyword", "format", "length"}.

    item: a TaskItem (uses `.images` (or `.image`), `.key_words`, `.scene`); with several images
    the clip term is the mean cosine of the description over them (see `clip_reward`).
    num_tokens: the response length in tokens (for the length term).
    scorer: a ClipScorer; without one, built-in items use `scene_reward` (key "scene") and items
    without a scene drop the visual term, the others' weights renormalised to sum as before.
    """
    term = visual_term(item, scorer)
    out = {
        # The built-in penalty on wrong scene words is for built-in items only: real data's key
        # words name part of what its image shows, even when they are all colours or shapes.
        "keyword": keyword_reward(response, getattr(item, "key_words", None),
                                  vocabulary="auto" if getattr(item, "scene", None) else None),
        "format": format_reward(response),
        "length": length_reward(num_tokens, weights.expected_length),
    }
    not_text = as_text(response) is None
    if not_text:  # counted once here, not once per term
        count_failure(failures, "not_text")
    if term == "clip":
        images = getattr(item, "images", None) or [item.image]
        out["clip"] = 0.0 if not_text else clip_reward(response, images, scorer, failures=failures)
    elif term == "scene":
        out["scene"] = 0.0 if not_text else scene_reward(response, item.scene, failures=failures)
    w = {"clip": weights.clip, "scene": weights.clip, "keyword": weights.keyword, "format": weights.format,
         "length": weights.length}
    total_w = weights.clip + weights.keyword + weights.format + weights.length
    used_w = sum(w[k] for k in out)
    scale = total_w / used_w if used_w > 0 else 0.0
    out["overall"] = float(sum(w[k] * v for k, v in out.items()) * scale)
    return out


def reasoning_reward(
    response: Any,
    item: Any,
    *,
    weights: ReasoningWeights = ReasoningWeights(),
    failures: RewardFailures | None = None,
) -> dict[str, float]:
    """Stage-2 reward of one response: {"overall", "accuracy", "format"}.

    item: a TaskItem (uses `.answer`) or the answer string itself.
    """
    answer = item if isinstance(item, str) else getattr(item, "answer", None)
    out = {"accuracy": accuracy_reward(response, answer, failures=failures), "format": format_reward(response)}
    out["overall"] = float(weights.accuracy * out["accuracy"] + weights.format * out["format"])
    return out


UNION_FORMULA = ("overall = (perception overall + reasoning overall) / 2 "
                 "= 0.2 scene|clip + 0.2 keyword + 0.05 length + 0.45 accuracy + 0.1 format")


def union_reward(perception: dict, reasoning: dict) -> dict:
    """The two stages' reward dicts of one response -> one GRPO stage on both rewards (the
    ablation's arm c): every component of both (format is the same function in both), "perception"
    and "reasoning" (each stage's overall), and overall = their mean (UNION_FORMULA)."""
    out = {k: float(v) for k, v in perception.items() if k != "overall"}
    out.update({k: float(v) for k, v in reasoning.items() if k != "overall"})
    out["perception"], out["reasoning"] = float(perception["overall"]), float(reasoning["overall"])
    out["overall"] = 0.5 * (out["perception"] + out["reasoning"])
    return out
