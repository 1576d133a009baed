"""The answer grader's time limit holds on any thread (issue 13), and the common case stays fast.

Before the fix, `accuracy_reward('### The final answer is: 9^+9999999', '1/2')` from a worker thread
returned after 21.5 s against a 2 s limit: sympy evaluated the power in C, holding the GIL.
"""
import os
import random
import threading
import time

import pytest

from pebr import rewards as R
from pebr.rewards import answer as A

needs_mathruler = pytest.mark.skipif(A._mathruler_grade is None, reason="mathruler.grader does not import here")
_SEED = int.from_bytes(os.urandom(4), "little")


def _in_thread(fn, limit_s: float):
    """(result, seconds) of fn() in a fresh thread; fails if it has not returned after limit_s."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t = time.perf_counter()
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"still running after {limit_s} s"
    return out[0], time.perf_counter() - t


def _warm_worker():
    """Have an idle grader process, so that a timed call does not pay its start (about 1 s)."""
    if A._mathruler_grade is not None:
        assert A._run_limited(abs, (-1,), 60.0) == 1


def _adversarial(rng: random.Random) -> list[str]:
    # 7-digit exponents: 5-20 s of big-integer work holding the GIL before the fix (so a thread
    # cannot even time it out); 9^+99999999 would run for many minutes, so it comes after.
    big = str(rng.randrange(10**6, 10**7))
    return [
        "9^+9999999", f"9^+{big}", "9^+99999999", f"{rng.randrange(2, 99)}^-{big}",
        f"(9^+99)^+{rng.randrange(99, 999)}",
        "10**10**10", "2^2^2^2^2^2", "2^+2^+2^+2^+2^+2", f"{big}!", f"({big})!", "9^+1e9", "x^+x^+x",
        "\\frac{" * rng.randrange(18, 25),  # pylatexenc: exponential in the nesting (15 levels took 8 s)
        "x" * 1_000_000, "(" * 100_000, "9" * 4000,
    ]


@pytest.mark.parametrize("truth", ["1/2", "5", "sqrt(2)"])
def test_adversarial_answers_return_in_time_from_a_thread(truth):
    rng = random.Random(_SEED)
    for given in _adversarial(rng):
        _warm_worker()
        score, seconds = _in_thread(lambda: R.accuracy_reward(f"### The final answer is: {given}", truth), 3.0)
        assert score == 0.0 and seconds < 2.5, (given[:40], truth, seconds, _SEED)


@needs_mathruler
def test_refused_and_timed_out_answers_are_counted():
    f = R.RewardFailures()
    for given in ["9^+9999999", "(9^+99)^+99", "2^+2^+2^+2^+2^+2", "9^+1e9", "10**10**10", "1" * 600]:
        assert R.accuracy_reward(f"### The final answer is: {given}", "1/2", failures=f) == 0.0
    assert f.grader_refused == 6 and f.grader_timeout == 0
    _warm_worker()
    score, seconds = _in_thread(
        lambda: R.accuracy_reward("### The final answer is: " + "\\frac{" * 20, "1/2", timeout_s=0.5, failures=f), 3.0)
    assert score == 0.0 and seconds < 1.5 and f.grader_timeout == 1


def test_hard_limit_from_a_thread_kills_and_recovers():
    # time.sleep stands in for any call that never returns (a C call no signal interrupts).
    _warm_worker()

    def slow():
        try:
            A._run_limited(time.sleep, (30,), 0.3)
        except A._GradeTimeout:
            return "timeout"
        return "returned"

    result, seconds = _in_thread(slow, 3.0)
    assert result == "timeout" and seconds < 1.5
    assert A._run_limited(abs, (-3,), 60.0) == 3  # a new grader process replaces the killed one
    with pytest.raises(A._GradeTimeout):
        A._run_limited(abs, (-3,), 0.0)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the memory limit needs /proc (Linux)")
def test_a_job_cannot_take_the_runs_memory():
    """A grading job that allocates past GRADER_MEMORY_BYTES fails in the grader (MemoryError,
    scored as a grading error), and the next job runs normally."""
    _warm_worker()
    with pytest.raises(A._GradeError, match="MemoryError"):
        A._run_limited(bytearray, (A.GRADER_MEMORY_BYTES + (512 << 20),), 60.0)
    assert A._run_limited(bytearray, (1 << 20,), 60.0) == bytearray(1 << 20)  # a normal job still fits
    assert A._run_limited(abs, (-4,), 60.0) == 4


@pytest.mark.parametrize("expr", [
    "(1/2)-(0.5)", "(x**2+2*x+1)-((x+1)**2)", "(3)-(9**+999)", "((9**30)**30)", "(sqrt(2))-(2**.5)", "(5!)-(120)",
    "(x**y)-(y**x)", "(2*pi)-(6.28)", "(1,2)", "(-3)-(--3)",
])
def test_screen_keeps_ordinary_expressions(expr):
    assert A._bounded_for_sympy(expr)


@pytest.mark.parametrize("expr", [
    "9**+9999999", "9**-1001", "(9**99)**99", "2**2**2", "x**x**x", "9**9!", "1001!", "9!!", "(9)!", "9**sqrt(99)",
    "9**(9)", "9**1e9", "9**1e999", "9**x(2)", "a.__class__", "__import__('os')", "[1]", "x=3", "9" * 101, "é",
    "9**", "(1))",
])
def test_screen_refuses_huge_or_odd_expressions(expr):
    assert not A._bounded_for_sympy(expr)


def test_screen_random_powers():
    rng = random.Random(_SEED)
    for _ in range(200):
        e, inner = rng.randrange(0, 3000), rng.randrange(1, 60)
        sign = rng.choice(["", "+", "-", "+-"])
        assert A._bounded_for_sympy(f"{rng.randrange(2, 99)}**{sign}{e}") == (e <= A._MAX_POWER), (e, _SEED)
        assert A._bounded_for_sympy(f"(x+2**{inner})**{sign}{e}") == (e * inner <= A._MAX_POWER), (e, inner, _SEED)


# (given, truth, correct): ordinary answers; a few of them need sympy (`0.50`, `\sqrt{4}`).
ORDINARY = [
    ("3", "3", 1), ("3.0", "3", 1), ("$3$", "3", 1), ("\\boxed{3}", "3", 1), ("4", "3", 0), ("30", "3", 0),
    ("1/2", "1/2", 1), ("0.5", "1/2", 1), ("\\frac{1}{2}", "1/2", 1), ("0.50", "1/2", 1), ("2/4", "1/2", 0),
    ("0.6", "1/2", 0), ("red", "red", 1), ("Red", "red", 1), ("blue", "red", 0), ("\\text{red}", "red", 1),
    ("11", "11", 1), ("12", "11", 0), ("x^2+2x+1", "(x+1)^2", 1), ("\\sqrt{4}", "2", 0), ("7", "seven", 0),
    ("(1,2)", "(1,2)", 1), ("(1,3)", "(1,2)", 0), ("-5", "-5", 1), ("1,000", "1000", 1),
]


@needs_mathruler
def test_common_case_is_correct_and_fast():
    _warm_worker()
    rng = random.Random(_SEED)
    cases = [rng.choice(ORDINARY) for _ in range(300)]
    t = time.perf_counter()
    scores = [R.accuracy_reward(f"### The final answer is: {g}", truth) for g, truth, _ in cases]
    per_call = (time.perf_counter() - t) / len(cases)
    assert scores == [float(c) for _, _, c in cases], _SEED
    # Measured here (2 shared cores, under load): 0.005-0.07 ms for the string-only cases (most),
    # 1.5-1.8 ms for those that need sympy in the grader process (0.1 ms of it the round trip),
    # 11 ms for the polynomial; about 0.7 ms per call over this mix.
    assert per_call < 0.02, per_call


@needs_mathruler
def test_same_verdicts_as_the_paper_grader():
    """The screened grader mirrors mathruler's grade_answer on ordinary (safe) answers."""
    import mathruler.grader as mr

    extra = {"2", "0.25", "\\frac14", "1/4", "x+1", "1+x"}
    pool = sorted({g for g, _, _ in ORDINARY} | {t for _, t, _ in ORDINARY} | extra)
    rng = random.Random(_SEED)
    for _ in range(150):
        given, truth = rng.choice(pool), rng.choice(pool)
        assert A._grade(given, truth, timeout_s=10.0) == mr.grade_answer(given, truth), (given, truth, _SEED)
