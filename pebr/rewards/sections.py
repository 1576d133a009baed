"""The structured response: its section headers, the text of the description and of the final
answer, the format reward, and the tally of responses that could not be scored."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

_HEADER_RE = {
    "description": re.compile(r"###\s*Image Description:", re.IGNORECASE),
    "rationales": re.compile(r"###\s*Rationales:", re.IGNORECASE),
    "step1": re.compile(r"###\s*Step\s*1:", re.IGNORECASE),
    "answer": re.compile(r"###\s*The final answer is:", re.IGNORECASE),
}

_SPACE_RE = re.compile(r"\s*")
ANY_HEADER_RE = re.compile(
    r"###\s*(?:Image Description:|Rationales:|Let's think step by step\.?|Step\s*\d+:|The final answer is:)",
    re.IGNORECASE,
)


@dataclass
class RewardFailures:
    """How many responses could not be scored on some part (for logging; pass `failures=`).

    not_text: the response was None or not text. no_description: no description section (the
    clip/scene term scored 0). no_answer: no final-answer line (the whole response was graded).
    grader_timeout: the grader ran past its time limit, or its process died (accuracy 0).
    scorer_error: the CLIP scorer raised (clip 0). grader_refused: the answer had a form the
    grader does not evaluate: an over-long answer line, a power or factorial past the size
    limits, characters sympy should not see (accuracy 0).
    """

    not_text: int = 0
    no_description: int = 0
    no_answer: int = 0
    grader_timeout: int = 0
    scorer_error: int = 0
    grader_refused: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def total(self) -> int:
        return sum(self.as_dict().values())

    def add(self, other: "RewardFailures") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def count_failure(failures: RewardFailures | None, name: str) -> None:
    """Add one to `failures.<name>` (nothing when `failures` is None)."""
    if failures is not None:
        setattr(failures, name, getattr(failures, name) + 1)


def as_text(response: Any) -> str | None:
    """The response as str, or None when it is not text (bytes are decoded leniently)."""
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray, memoryview)):
        return bytes(response).decode("utf-8", errors="replace")
    return None


def extract_description(response: Any) -> str | None:
    """Text between `### Image Description:` and the next `### Rationales:`, stripped.

    None when either header is missing (the paper's regex then yields an empty caption).
    """
    text = as_text(response)
    if text is None:
        return None
    start = _HEADER_RE["description"].search(text)
    if start is None:
        return None
    end = _HEADER_RE["rationales"].search(text, start.end())
    if end is None:
        return None
    return text[start.end():end.start()].strip()


def extract_answer(response: Any) -> str | None:
    """The text after the first `### The final answer is:` (skipping blank space and line
    breaks, as the paper's `\\s*` does) up to the end of that line, stripped; None if absent."""
    text = as_text(response)
    if text is None:
        return None
    match = _HEADER_RE["answer"].search(text)
    if match is None:
        return None
    i = _SPACE_RE.match(text, match.end()).end()
    end = text.find("\n", i)
    return text[i: len(text) if end < 0 else end].strip()


def format_reward(response: Any) -> float:
    """1.0 if `### Image Description:`, `### Rationales:`, `### Step 1:` and
    `### The final answer is:` all appear (any order, any case, as in the paper), else 0.0."""
    text = as_text(response)
    if text is None:
        return 0.0
    return 1.0 if all(p.search(text) for p in _HEADER_RE.values()) else 0.0
