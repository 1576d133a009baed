"""Rewards of both stages against hand-made responses, in the paper's exact format included."""
import math
import os
import threading
import time

import numpy as np
import pytest
import torch

from pebr import rewards as R
from pebr.rewards import answer as A
from pebr.data.prompts import ANSWER_HEADER, format_response
from pebr.data.scenes import COLOURS, SHAPES, Scene
from pebr.data.tasks import generate_items

# The paper's layout (Mulberry): headers on their own lines, blank lines between sections.
PAPER_RESPONSE = """### Image Description:
The image shows a red circle, a blue square with the digit 3 and a green triangle.

### Rationales:
The question asks for the digit inside the blue square.

### Let's think step by step.

### Step 1:
Locate the blue square.

### Step 2:
Read the digit inside it: 3.

### The final answer is: 3"""

SCENE = Scene.from_dict({
    "kind": "digits",
    "objects": [
        {"shape": "circle", "colour": "red", "col": 0, "row": 0},
        {"shape": "square", "colour": "blue", "col": 1, "row": 0, "digit": 3},
        {"shape": "triangle", "colour": "green", "col": 2, "row": 2},
    ],
})

JUNK = [
    None,
    12,
    ["### The final answer is: 3"],
    b"\x00\xff\xfe" * 100,
    bytes(range(256)).decode("latin-1"),
    os.urandom(4096).decode("utf-8", errors="surrogateescape"),
    "x" * 1_000_000,
    "### Image Description:" * 50_000,  # a header repeated, never closed
    "### The final answer is:" + " " * 1_000_000,
    "### The final answer is: " + "(" * 100_000,
    "",
]


@pytest.fixture(params=["mathruler", "builtin"])
def grader(request, monkeypatch):
    """Run accuracy tests with the paper's grader (if importable here) and the built-in one."""
    if request.param == "mathruler" and A._mathruler_grade is None:
        pytest.skip("mathruler.grader does not import here (needs pylatexenc)")
    if request.param == "builtin":
        monkeypatch.setattr(A, "_mathruler_grade", None)
        monkeypatch.setattr(A, "_warned_builtin", True)
    return request.param


# --- format ---------------------------------------------------------------------------------


def test_format_paper_response():
    assert R.format_reward(PAPER_RESPONSE) == 1.0


@pytest.mark.parametrize("header", ["### Image Description:", "### Rationales:", "### Step 1:", "### The final answer is:"])
def test_format_missing_required_section(header):
    assert R.format_reward(PAPER_RESPONSE.replace(header, "")) == 0.0


def test_format_tolerates_case_and_spacing_but_not_step_by_step_line():
    # The paper's regexes: `###\s*...`, case-insensitive; the step-by-step line is not required.
    text = PAPER_RESPONSE.replace("### Image Description:", "###image description:").replace(
        "### Let's think step by step.", "")
    assert R.format_reward(text) == 1.0


# --- keyword, length ------------------------------------------------------------------------


def test_keyword_fraction_and_case():
    # Key words that are a part of what the image shows (as in real data): coverage only.
    assert R.keyword_reward(PAPER_RESPONSE, ["RED", "Blue", "3", "purple"], vocabulary=None) == 0.75
    assert R.keyword_reward(PAPER_RESPONSE, "red, circle ,yellow", vocabulary=None) == pytest.approx(2 / 3)
    assert R.keyword_reward(PAPER_RESPONSE.upper(), ["square"], vocabulary=None) == 1.0
    # The default treats built-in key words as the scene's complete list: each other colour or
    # shape named cancels one found key word (3 found; circle, square, green, triangle: 0).
    assert R.keyword_reward(PAPER_RESPONSE, ["RED", "Blue", "3", "purple"]) == 0.0
    assert R.keyword_reward(PAPER_RESPONSE, ["red", "circle", "blue", "square", "3", "green"]) == pytest.approx(5 / 6)
    scene_words = ["red", "circle", "blue", "square", "3", "green", "triangle"]
    assert R.keyword_reward(PAPER_RESPONSE, scene_words) == 1.0


def test_keyword_empty_is_zero():
    # Paper: no key words -> 0 (the same for every response of the prompt, so no advantage).
    assert R.keyword_reward(PAPER_RESPONSE, []) == 0.0
    assert R.keyword_reward(PAPER_RESPONSE, None) == 0.0
    assert R.keyword_reward(PAPER_RESPONSE, ["", "  "]) == 0.0


@pytest.mark.parametrize("n, expected", [(0, 1.0), (100, 1.0), (512, 1.0), (1024, 0.5), (2048, 0.25)])
def test_length(n, expected):
    assert R.length_reward(n, expected=512) == pytest.approx(expected)


def test_length_bad_inputs():
    assert R.length_reward(None) == 0.0
    assert R.length_reward(float("nan")) == 0.0
    assert R.length_reward(-3) == 0.0
    assert R.length_reward(torch.tensor(1024)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="expected"):
        R.length_reward(10, expected=0)


# --- accuracy -------------------------------------------------------------------------------


def _answer(ans: str) -> str:
    return PAPER_RESPONSE.replace("### The final answer is: 3", f"### The final answer is: {ans}")


@pytest.mark.parametrize("given", ["3", " 3 ", "3.0", "\\boxed{3}", "$3$", "\\boxed{3.0}"])
def test_accuracy_numeric_forms(grader, given):
    assert R.accuracy_reward(_answer(given), "3") == 1.0


@pytest.mark.parametrize("given", ["4", "30", "3/4", "three or 4", "", "\\boxed{}"])
def test_accuracy_wrong(grader, given):
    assert R.accuracy_reward(_answer(given), "3") == 0.0


def test_accuracy_words(grader):
    for given in ["red", "Red", "RED", "\\boxed{red}", "\\text{red}"]:
        assert R.accuracy_reward(_answer(given), "red") == 1.0, given
    assert R.accuracy_reward(_answer("blue"), "red") == 0.0


def test_accuracy_reads_only_the_answer_line(grader):
    assert R.accuracy_reward(_answer("3\nor maybe 4"), "3") == 1.0
    assert R.accuracy_reward(_answer("4\nactually 3"), "3") == 0.0
    # `\s*` after the header skips a line break, as the paper's regex does.
    assert R.accuracy_reward(PAPER_RESPONSE.replace("is: 3", "is:\n\n3"), "3") == 1.0
    assert R.extract_answer(PAPER_RESPONSE) == "3"


def test_accuracy_without_header_grades_the_whole_response(grader):
    # The paper: no `### The final answer is:` line -> the whole stripped response is graded.
    f = R.RewardFailures()
    assert R.accuracy_reward("7", "7", failures=f) == 1.0
    assert R.accuracy_reward("  \\boxed{7}\n", "7", failures=f) == 1.0
    assert R.accuracy_reward("8", "7", failures=f) == 0.0
    assert R.accuracy_reward("the answer is 7", "7", failures=f) == 0.0  # the whole text, not a search
    assert R.accuracy_reward(None, "3", failures=f) == 0.0
    assert f.no_answer == 4 and f.not_text == 1 and f.total() == 5
    assert R.reasoning_reward("7", "7") == {"accuracy": 1.0, "format": 0.0, "overall": pytest.approx(0.9)}


def test_accuracy_without_header_long_text_is_not_graded(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "_grade", lambda given, truth, **kw: calls.append(given) or True)
    assert R.accuracy_reward("7 " * 300, "7") == 0.0  # > 512 characters: wrong without grading
    assert R.accuracy_reward("2**1000", "7") == 0.0  # a huge-number operator the truth lacks
    assert calls == []
    assert R.accuracy_reward("7", "7") == 1.0 and calls == ["7"]


def test_accuracy_huge_number_answer_is_not_evaluated(grader):
    t = time.perf_counter()
    assert R.accuracy_reward(_answer("9**9**9**9"), "sqrt(2)") == 0.0
    assert R.accuracy_reward(_answer("99999999!"), "2") == 0.0
    assert time.perf_counter() - t < 2.0


# pylatexenc takes exponential time on nested unclosed macros (15 levels: 8 s; 20: minutes).
SLOW_LATEX = "\\frac{" * 20


def _warm_grader_process():
    assert A._run_limited(abs, (-1,), 60.0) == 1  # its start (about 1 s) is not part of the limit


@pytest.mark.skipif(A._mathruler_grade is None, reason="mathruler.grader does not import here")
def test_grader_timeout_main_thread():
    import signal

    _warm_grader_process()
    handler = signal.getsignal(signal.SIGALRM)
    f = R.RewardFailures()
    t = time.perf_counter()
    assert R.accuracy_reward(_answer(SLOW_LATEX), "1/2", timeout_s=0.2, failures=f) == 0.0
    assert time.perf_counter() - t < 2.0
    assert f.grader_timeout == 1 and signal.getsignal(signal.SIGALRM) is handler  # no alarm used
    assert R.accuracy_reward(_answer("0.50"), "1/2") == 1.0  # a new grader process took over


@pytest.mark.skipif(A._mathruler_grade is None, reason="mathruler.grader does not import here")
def test_grader_timeout_worker_thread():
    _warm_grader_process()
    f = R.RewardFailures()
    out = []
    grade = lambda: out.append(R.accuracy_reward(_answer(SLOW_LATEX), "1/2", timeout_s=0.2, failures=f))  # noqa: E731
    worker = threading.Thread(target=grade)
    t = time.perf_counter()
    worker.start()
    worker.join(5)
    assert out == [0.0] and f.grader_timeout == 1 and time.perf_counter() - t < 2.0


def test_grader_restores_outer_alarm():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        assert R.accuracy_reward(_answer("3"), "3") == 1.0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # the outer timer is still running
        time.sleep(0.7)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- junk never raises ----------------------------------------------------------------------


@pytest.mark.parametrize("response", JUNK, ids=lambda r: f"{type(r).__name__}:{len(r) if hasattr(r, '__len__') else r}")
def test_junk_never_raises(response):
    item = generate_items(1, seed=0)[0]
    t = time.perf_counter()
    scores = [
        R.format_reward(response),
        R.keyword_reward(response, item.key_words),
        R.accuracy_reward(response, item.answer),
        R.scene_reward(response, item.scene),
        *R.perception_reward(response, item, num_tokens=10).values(),
        *R.reasoning_reward(response, item).values(),
    ]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert R.extract_description(response) in (None, "") or isinstance(R.extract_description(response), str)
    assert time.perf_counter() - t < 2.0


# --- scene reward ---------------------------------------------------------------------------


def _with_description(desc: str) -> str:
    return format_response(desc, "r", ["s"], "3")


def test_scene_reward_exact_description():
    assert R.scene_reward(PAPER_RESPONSE, SCENE) == 1.0
    assert R.scene_reward(PAPER_RESPONSE, SCENE.to_dict()) == 1.0


def test_scene_reward_partial_and_hallucinated():
    full = R.scene_reward(_with_description("a red circle, a blue square with 3, a green triangle"), SCENE)
    missing = R.scene_reward(_with_description("a red circle and a blue square with 3"), SCENE)
    wrong_digit = R.scene_reward(_with_description("a red circle, a blue square with 5, a green triangle"), SCENE)
    extra = R.scene_reward(_with_description(
        "a red circle, a blue square with 3, a green triangle, a yellow diamond, two purple circles"), SCENE)
    hedge = R.scene_reward(_with_description(
        " ".join(f"{c} {s}" for c in COLOURS for s in SHAPES) + " 0 1 2 3 4 5 6 7 8 9"), SCENE)
    assert full == 1.0
    assert 0 < missing < full and 0 < wrong_digit < full and 0 < extra < full
    assert hedge < 0.3  # naming everything does not pay
    assert R.scene_reward(_with_description(""), SCENE) == 0.0
    assert R.scene_reward(_with_description("a nice picture"), SCENE) == 0.0


def test_scene_reward_counts_number_words():
    scene = Scene.from_dict({"kind": "shapes", "objects": [
        {"shape": "circle", "colour": "red", "col": 0, "row": 0},
        {"shape": "circle", "colour": "red", "col": 2, "row": 0}]})
    assert R.scene_reward(_with_description("two red circles"), scene) == 1.0
    assert R.scene_reward(_with_description("a red circle"), scene) < 1.0


def test_scene_reward_missing_description_counted():
    f = R.RewardFailures()
    assert R.scene_reward("no sections here", SCENE, failures=f) == 0.0
    assert R.scene_reward(PAPER_RESPONSE, {"kind": "nonsense"}, failures=f) == 0.0
    assert f.no_description == 1


def test_extract_description():
    assert R.extract_description(PAPER_RESPONSE).startswith("The image shows a red circle")
    assert R.extract_description("### Image Description: only this") is None
    assert R.extract_description("### Rationales: x ### Image Description: y") is None


# --- stage rewards --------------------------------------------------------------------------


def test_reference_responses_score_full_marks():
    for item in generate_items(24, seed=5):
        p = R.perception_reward(item.reference_response, item, num_tokens=len(item.reference_response))
        r = R.reasoning_reward(item.reference_response, item)
        assert p == {"keyword": 1.0, "format": 1.0, "length": 1.0, "scene": 1.0, "overall": pytest.approx(1.0)}
        assert r == {"accuracy": 1.0, "format": 1.0, "overall": pytest.approx(1.0)}


def test_perception_weights_combine():
    item = generate_items(1, seed=2)[0]
    resp = item.reference_response.replace(ANSWER_HEADER, "")  # format 0
    w = R.PerceptionWeights(clip=0.4, keyword=0.4, format=0.1, length=0.1)
    out = R.perception_reward(resp, item, num_tokens=1024, weights=w)
    assert out["format"] == 0.0 and out["length"] == 0.5
    assert out["overall"] == pytest.approx(0.4 * out["scene"] + 0.4 * out["keyword"] + 0.05)


def test_real_data_key_words_cost_nothing_for_other_scene_words():
    """A real-data item (no scene) whose key words happen to be all colours and shapes: naming more
    of the image than its key words is no hallucination there, so nothing is taken off; a built-in
    item with the same key words and description loses one found word per wrong scene word."""
    item = generate_items(1, seed=2)[0]
    desc = "### Image Description: a red circle beside a blue square.\n### Rationales: r"
    item.key_words = ["red", "circle"]
    built_in = R.perception_reward(desc, item, num_tokens=10)["keyword"]
    item.scene = None
    real = R.perception_reward(desc, item, num_tokens=10)["keyword"]
    assert real == 1.0 and built_in == 0.0


def test_perception_without_visual_term_renormalises():
    item = generate_items(1, seed=2)[0]
    item.scene = None
    out = R.perception_reward(item.reference_response, item, num_tokens=10)
    assert set(out) == {"keyword", "format", "length", "overall"} and out["overall"] == pytest.approx(1.0)
    assert R.visual_term(item, None) is None


def test_reasoning_weights():
    out = R.reasoning_reward(_answer("4"), "3", weights=R.ReasoningWeights(accuracy=0.9, format=0.1))
    assert out == {"accuracy": 0.0, "format": 1.0, "overall": pytest.approx(0.1)}


@pytest.mark.parametrize("bad", [dict(clip=-0.1), dict(keyword=float("nan")), dict(clip=0, keyword=0, format=0, length=0)])
def test_bad_weights(bad):
    with pytest.raises(ValueError):
        R.PerceptionWeights(**bad)


def test_stage_rewards_count_failures_once_per_response():
    f = R.RewardFailures()
    R.reasoning_reward("no header", "3", failures=f)
    R.perception_reward(None, generate_items(1, seed=0)[0], num_tokens=3, failures=f)
    R.perception_reward("no sections", generate_items(1, seed=0)[0], num_tokens=3, failures=f)
    assert f.as_dict() == {"not_text": 1, "no_description": 1, "no_answer": 1, "grader_timeout": 0, "scorer_error": 0,
                           "grader_refused": 0}
    g = R.RewardFailures(grader_timeout=2)
    g.add(f)
    assert g.total() == 5


def test_keyword_ignores_headers_and_needs_whole_numbers():
    # "1" would be found in every structured response ("### Step 1:") by a plain substring test.
    assert R.keyword_reward(PAPER_RESPONSE, ["1"]) == 0.0
    assert R.keyword_reward(_with_description("the digit 10"), ["1"]) == 0.0
    assert R.keyword_reward(_with_description("the digit 1."), ["1"]) == 1.0
    assert R.keyword_reward(PAPER_RESPONSE, ["description", "rationales"]) == 0.0


def test_fuzz_header_soup_stays_in_range():
    rng = np.random.default_rng(0)
    pieces = ["### Image Description:", "### Rationales:", "### Step 1:", "### The final answer is:", "\n", " ",
              "red", "circle", "3", "\\boxed{", "}", "$", "**", "^{", "(", ")", "\x00", "é", "### ", "two", "9.0"]
    item = generate_items(2, seed=0)[1]
    for _ in range(300):
        text = "".join(rng.choice(pieces, size=int(rng.integers(0, 40))))
        p = R.perception_reward(text, item, num_tokens=int(rng.integers(0, 4000)))
        r = R.reasoning_reward(text, item)
        assert all(0.0 <= v <= 1.0 for v in [*p.values(), *r.values()]), text


@pytest.mark.parametrize("style", ["short", "full"])
def test_prompt_asks_for_every_section(style):
    from pebr.data.prompts import REQUIRED_HEADERS, STEP_BY_STEP_HEADER, build_prompt

    prompt = build_prompt("<image>What colour is the  circle?", style=style)
    assert "<image>" not in prompt and "What colour is the circle?" in prompt
    assert all(h in prompt for h in (*REQUIRED_HEADERS, STEP_BY_STEP_HEADER))
    with pytest.raises(ValueError, match="style"):
        build_prompt("q", style="long")


def test_format_response_parses_back():
    text = format_response(" a red circle ", "look", ["one", "two"], " 7 ")
    assert R.format_reward(text) == 1.0
    assert R.extract_description(text) == "a red circle" and R.extract_answer(text) == "7"
    assert "### Step 2: two" in text and R.format_reward(format_response("d", "r", [], "1")) == 1.0
