"""Answer grading: the text after `### The final answer is:` (or, without that line, the whole
response, as the paper does) against the ground truth, by the paper's grader under a time limit."""
from __future__ import annotations

import math
import re
import signal
import threading
import warnings
from typing import Any

from pebr.rewards.sections import RewardFailures, as_text, count_failure, extract_answer

try:  # the paper's grader; needs pylatexenc (a dependency mathruler does not declare)
    from mathruler.grader import grade_answer as _mathruler_grade
    GRADER = "mathruler"
except Exception as _exc:  # pragma: no cover - depends on the environment
    _mathruler_grade = None
    GRADER = "builtin"
    _GRADER_IMPORT_ERROR = repr(_exc)

GRADE_TIMEOUT_S = 2.0
_MAX_ANSWER_CHARS = 512  # a longer answer cannot be a short ground truth; skip sympy
# Operators that build astronomically large integers (`9**9**9**9`, `99999!`) in C code that no
# alarm can interrupt and that hold the GIL. An answer using one where the ground truth does not
# is graded wrong without evaluation (mathruler already refuses `^{`, `^(` and `^99`).
_HUGE_NUMBER_OPS = ("**", "!")


def _unbox(answer: str) -> str:
    """The content of the last `\\boxed{...}` in `answer`, or `answer` itself."""
    start = answer.rfind("\\boxed{")
    if start < 0:
        return answer
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(answer)):
        if answer[i] == "{":
            depth += 1
        elif answer[i] == "}":
            if depth == 0:
                return answer[begin:i].strip()
            depth -= 1
    return answer


class _GradeTimeout(Exception):
    pass


def _builtin_grade(given: str, truth: str) -> bool:
    """Exact match after light normalisation, or equal as numbers (used without mathruler)."""

    def norm(s: str) -> str:
        s = _unbox(s.strip())
        s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).replace("$", "")
        return " ".join(s.lower().rstrip(".").split())

    g, t = norm(given), norm(truth)
    if g == t:
        return True
    try:
        a, b = float(g.replace(",", "")), float(t.replace(",", ""))
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _grade(given: str, truth: str) -> bool:
    if _mathruler_grade is None:
        return _builtin_grade(given, truth)
    return bool(_mathruler_grade(given, truth))


def _grade_with_timeout(given: str, truth: str, timeout_s: float) -> bool:
    """`_grade` under a time limit: SIGALRM in the main thread (interrupts sympy), else a helper
    thread that is abandoned on timeout (Python cannot kill a thread; it is a daemon). Neither
    interrupts one long C call, hence the `_HUGE_NUMBER_OPS` filter before grading.
    `timeout_s` None or <= 0: no limit."""
    if timeout_s is None or timeout_s <= 0:
        return _grade(given, truth)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        # mathruler wraps sympy in bare `except:` blocks that swallow the first alarm, so the
        # timer repeats every 50 ms until grading returns; `fired` tells a swallowed timeout.
        state = {"armed": True, "fired": False}

        def on_alarm(signum, frame):
            if state["armed"]:
                state["fired"] = True
                raise _GradeTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
        try:
            result = _grade(given, truth)
        except _GradeTimeout:
            result = False
        finally:
            state["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if old_delay > 0:  # give an outer timer back (about) what it had left
                signal.setitimer(signal.ITIMER_REAL, old_delay, old_interval)
        if state["fired"]:
            raise _GradeTimeout
        return result
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(_grade(given, truth)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _GradeTimeout
    return bool(result and result[0])


_warned_builtin = False


def accuracy_reward(
    response: Any, answer: Any, *, timeout_s: float = GRADE_TIMEOUT_S, failures: RewardFailures | None = None
) -> float:
    """1.0 if the final-answer line matches `answer`, else 0.0.

    The final-answer line is the text after `### The final answer is:` to the line end; a response
    without that header is graded whole (stripped), as the paper's `accuracy_reward` does, and
    counted in `failures.no_answer`. Graded by `mathruler.grader.grade_answer` (the paper's
    grader: `3.0`, `\\boxed{3}`, `$3$` equal 3; words compare case-insensitively) under
    `timeout_s`; when mathruler cannot be imported (it needs pylatexenc), by a built-in
    exact/numeric comparison (`GRADER` says which). An answer longer than
    max(512, 4 x the truth) characters is wrong without grading (sympy on arbitrary text is the
    hang risk).
    """
    global _warned_builtin
    text = as_text(response)
    if text is None:
        count_failure(failures, "not_text")
        return 0.0
    given = extract_answer(text)
    if given is None:
        count_failure(failures, "no_answer")
        given = text.strip()
    truth = "" if answer is None else str(answer).strip()
    if len(given) > max(_MAX_ANSWER_CHARS, 4 * len(truth)):
        return 0.0
    given = _unbox(given)
    if not given or not truth:
        return 0.0
    if any(op in given and op not in truth for op in _HUGE_NUMBER_OPS):
        return 0.0
    if _mathruler_grade is None and not _warned_builtin:
        _warned_builtin = True
        warnings.warn(f"mathruler grader unavailable ({_GRADER_IMPORT_ERROR}); using the built-in grader")
    try:
        return 1.0 if _grade_with_timeout(given, truth, timeout_s) else 0.0
    except _GradeTimeout:
        count_failure(failures, "grader_timeout")
        return 0.0
    except Exception:  # a grader bug on odd input is a wrong answer, not a crashed run
        return 0.0
