"""The structured (Mulberry-style) prompt and response format of PeBR-R1.

The paper's format prompt (`examples/format_prompt/pebr_format.jinja` in its repository) asks
for these sections, in this order:

    ### Image Description:        what is in the image (scored by the perception stage)
    ### Rationales:               how to approach the question
    ### Let's think step by step.
    ### Step 1: ... ### Step k:   the reasoning
    ### The final answer is: X    the answer alone (graded by the reasoning stage)

`build_prompt` is a shortened version of that instruction: the built-in policy is tiny and its
tokenizer is byte-level, so every prompt character costs a token.
"""
from __future__ import annotations

import re

DESCRIPTION_HEADER = "### Image Description:"
RATIONALES_HEADER = "### Rationales:"
STEP_BY_STEP_HEADER = "### Let's think step by step."
STEP_HEADER = "### Step {index}:"
ANSWER_HEADER = "### The final answer is:"
# The headers the format reward requires (the paper's `format_reward`): the step-by-step line is
# asked for but not checked, and only the first step is.
REQUIRED_HEADERS = (DESCRIPTION_HEADER, RATIONALES_HEADER, STEP_HEADER.format(index=1), ANSWER_HEADER)

# The `<image>` placeholder the paper's data puts in problems (where the image goes in the chat).
IMAGE_PLACEHOLDER = "<image>"

_INSTRUCTION = (
    "Answer in sections: ### Image Description:, ### Rationales:, "
    "### Let's think step by step., ### Step 1: ..., ### The final answer is: (answer only)."
)


def strip_image_placeholder(problem: str) -> str:
    """`problem` without `<image>` placeholders (the image is passed separately), trimmed."""
    # Collapse the spaces a removed placeholder leaves behind, keep line breaks.
    return re.sub(r"[ \t]{2,}", " ", problem.replace(IMAGE_PLACEHOLDER, " ")).strip()


# The long form, for real (7B-class) models: the same sections, spelled out the way the paper's
# format prompt does (instruction first, then the question).
_FULL_INSTRUCTION = (
    "First describe the image as it bears on the question. Then give the rationale for how to "
    "solve it. Then reason step by step, briefly and logically. Finally state only the result "
    "after 'The final answer is:', with no explanation.\n\n"
    "Use these sections, each starting with ###:\n"
    f"{DESCRIPTION_HEADER}\n{RATIONALES_HEADER}\n{STEP_BY_STEP_HEADER}\n"
    f"{STEP_HEADER.format(index=1)}\n{STEP_HEADER.format(index=2)}\n...\n{ANSWER_HEADER}"
)
PROMPT_STYLES = ("short", "full")


def build_prompt(problem: str, *, style: str = "short") -> str:
    """The user text for one item.

    problem: the question; an `<image>` placeholder in it is removed (the chat template places
    the image before the text).
    style: "short" (the question, then a one-line format instruction: for the tiny byte-level
    policy, where every character is a token) or "full" (the paper's layout: the format
    instruction spelled out, then the question; for real models).
    """
    question = strip_image_placeholder(str(problem))
    if style == "short":
        return f"{question}\n{_INSTRUCTION}"
    if style == "full":
        return f"{_FULL_INSTRUCTION}\n\n{question}"
    raise ValueError(f"style: expected one of {PROMPT_STYLES}, got {style!r}")


def format_response(description: str, rationales: str, steps: list[str], answer: str) -> str:
    """A response in the structured format (used for reference responses and warm-up SFT).

    steps: one string per `### Step i:` section (at least one, so the format reward is met;
    an empty list gives a single empty step).
    """
    steps = list(steps) or [""]
    parts = [f"{DESCRIPTION_HEADER} {description.strip()}", f"{RATIONALES_HEADER} {rationales.strip()}", STEP_BY_STEP_HEADER]
    parts += [f"{STEP_HEADER.format(index=i)} {step.strip()}" for i, step in enumerate(steps, start=1)]
    parts.append(f"{ANSWER_HEADER} {str(answer).strip()}")
    return "\n".join(parts)
