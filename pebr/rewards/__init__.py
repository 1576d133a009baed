"""Rewards of the two PeBR-R1 stages (the paper's `pebr_1.py` / `pebr_2.py`), hardened.

Stage 1, perception: `0.4*clip + 0.4*keyword + 0.1*format + 0.1*length`.
Stage 2, reasoning:  `0.9*accuracy + 0.1*format`.

    sections.py    headers, description/answer extraction, format reward, RewardFailures
    answer.py      accuracy: the paper's grader behind input limits, under a hard time limit
    perception.py  keyword, length and scene terms
    clip.py        ClipScorer and the clip term
    weighted.py    the weighted stage rewards (perception, reasoning, and their union for the ablation)

Every component is a plain function of the response text that returns a float in [0, 1] and
never raises on any response: None, bytes, binary junk and megabyte strings score 0 on the parts
they break. Parsing is linear in the response length (no regex with nested lazy scans), and the
answer grader's slow parts (pylatexenc, sympy) run in a grader process killed at the time limit,
from any thread, behind input limits that refuse huge powers and factorials unevaluated.

Where this departs from the paper's reward code, and why:
- A response without `### The final answer is:` is graded whole, as in the paper, but an answer
  longer than max(512, 4 x the truth) characters, or one using `**` or `!` where the truth does
  not, is wrong without grading (sympy on arbitrary text is the hang risk). Such responses are
  counted in `RewardFailures.no_answer`. An answer sympy would see with a power or factorial past
  the size limits (`9^+9999999`, `(9^99)^99`) is wrong unevaluated (`grader_refused`).
- `\\boxed{x}` in the answer line is unwrapped before grading (mathruler alone already accepts
  `\\boxed{3}` for 3; this also covers `\\boxed{red}`).
- Keywords are searched only in the image description, as whole words, each once; with key
  words from the built-in vocabulary, each other colour, shape or number named cancels one found
  key word, and descriptions past 150 words decay (the paper's term, any substring anywhere, was
  raised by keyword stuffing; `keyword_reward(section="response", vocabulary=None,
  max_words=None)` is close to it). Headers are never searched (the paper's substring test finds
  "1" in every response, in "### Step 1:").
- The answer header is matched like the format reward matches it (case-insensitive, any spaces
  after `###`), so format and accuracy agree on what a header is.
- CLIP: `min(1, cos/0.4)` is also clamped at 0 (a negative cosine gave a negative reward).
- Built-in items have an exact scene, so without a CLIP model `scene_reward` (precision/recall
  of the described objects against the scene) takes the clip term's weight, under key "scene".
"""
from pebr.rewards.answer import GRADE_TIMEOUT_S, GRADER, accuracy_reward
from pebr.rewards.clip import CLIP_SCALE, ClipScorer, clip_reward, clip_score_to_reward
from pebr.rewards.perception import (
                                   KEYWORD_MAX_WORDS,
                                   keyword_reward,
                                   length_reward,
                                   scene_reward,
)
from pebr.rewards.sections import (
                                   RewardFailures,
                                   extract_answer,
                                   extract_description,
                                   format_reward,
)
from pebr.rewards.weighted import (
                                   UNION_FORMULA,
                                   PerceptionWeights,
                                   ReasoningWeights,
                                   perception_reward,
                                   reasoning_reward,
                                   union_reward,
                                   visual_term,
)

__all__ = [
    "GRADER", "GRADE_TIMEOUT_S", "KEYWORD_MAX_WORDS", "CLIP_SCALE", "RewardFailures", "extract_description",
    "extract_answer", "format_reward", "keyword_reward", "length_reward", "accuracy_reward", "scene_reward",
    "ClipScorer", "clip_score_to_reward", "clip_reward", "PerceptionWeights", "ReasoningWeights", "visual_term",
    "perception_reward", "reasoning_reward", "union_reward", "UNION_FORMULA",
]
