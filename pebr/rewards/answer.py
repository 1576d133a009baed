"""Answer grading: the text after `### The final answer is:` (or, without that line, the whole
response, as the paper does) against the ground truth, by the paper's grader under a hard time
limit that holds on any thread.

Model output is untrusted text, and the paper's grader runs it through pylatexenc (exponential
time on nested macros: 15 unclosed `\\frac{` took 8 s) and sympy (`parse_expr` evaluates
`9^+9999999` as a big-integer power that holds the GIL for minutes). So grading has two layers:

1. Input limits, in this process: a length limit on the answer, and a screen on the exact text
   sympy would parse (`_bounded_for_sympy`: a character whitelist, at most 100 digits a number,
   a power's exponent a plain number or symbol with |exponent| x (exponents inside its base)
   <= 1000, no towers, factorials of plain numbers <= 1000). What fails it scores 0 and is counted
   in `RewardFailures.grader_refused`.
2. A hard time limit: whatever may still be slow (pylatexenc on any answer with a backslash;
   sympy) runs in a persistent grader process that is killed at the limit (counted in
   `grader_timeout`). A thread cannot be killed and an alarm works only on the main thread; a
   process works from any thread, and a persistent one keeps the round trip at about 0.1 ms.

The common case never leaves this process: mathruler's string comparisons (`3`, `3.0`, `$3$`,
`\\boxed{3}`, `0.5` and `1/2` and `\\frac{1}{2}`, words) and integer against integer.
"""
from __future__ import annotations

import atexit
import math
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from multiprocessing.connection import Connection
from typing import Any, Callable

from pebr.rewards.sections import RewardFailures, as_text, count_failure, extract_answer

try:  # the paper's grader; needs pylatexenc (a dependency mathruler does not declare)
    import mathruler.grader as _mr
    from mathruler.grader import grade_answer as _mathruler_grade
    GRADER = "mathruler"
except Exception as _exc:  # pragma: no cover - depends on the environment
    _mr = None
    _mathruler_grade = None
    GRADER = "builtin"
    _GRADER_IMPORT_ERROR = repr(_exc)

GRADE_TIMEOUT_S = 2.0
_MAX_ANSWER_CHARS = 512  # a longer answer cannot be a short ground truth; skip sympy
# Operators that build astronomically large integers (`9**9**9**9`, `99999!`). An answer using one
# where the ground truth does not is graded wrong without evaluation (a cheap first filter; the
# sympy screen below bounds them too).
_HUGE_NUMBER_OPS = ("**", "!")
# Limits of the sympy screen. mathruler itself refuses unsigned exponents of two or more digits
# (`\^[0-9][0-9]+`): a bigger one reaches sympy only with a sign (`9^+9999999`) or as `**`.
# 9^1000 has 955 digits (microseconds to compute), 9^9999999 9.5 million (21 s); 999! has 2565.
_MAX_NUMBER_CHARS = 100
_MAX_POWER = 1000.0  # |exponent| x the largest exponent inside its base: (9^30)^30 -> 900
_MAX_FACTORIAL = 1000
_WORKER_STARTUP_S = 120.0  # importing sympy in the grader process; not part of the grading limit
_MAX_IDLE_WORKERS = 4  # grader processes kept for reuse (one per thread grading at once)


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
    """The grader ran past its time limit, or its process died."""


class _GradeRefused(Exception):
    """The answer has a form the grader does not evaluate (see `_bounded_for_sympy`)."""


class _GradeError(Exception):
    """The grader raised in the grader process (a grader bug on odd input: a wrong answer)."""


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


# --- the sympy screen -------------------------------------------------------------------------

_SYMPY_TOKEN_RE = re.compile(
    r"(?P<num>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?)|(?P<name>[a-z]+)|(?P<op>\*\*|[-+*/^(),!])|(?P<space>\s+)"
)
_INT_RE = re.compile(r"-?[0-9]{1,100}")


def _bounded_for_sympy(expr: str) -> bool:
    """True if sympy may parse `expr` (mathruler's `(truth)-(given)`, normalised: lower case).

    Only ASCII digits, lower-case letters, `+-*/^(),!.` and spaces; numbers of at most
    `_MAX_NUMBER_CHARS` characters; each power's exponent (after any signs) a plain number or a
    short symbol, not followed by another power, a factorial, a call or an implicit product, with
    |exponent| times the largest exponent inside a parenthesised base <= `_MAX_POWER`; `!` only
    after a plain integer <= `_MAX_FACTORIAL`. Every value sympy then builds has at most
    about 10^5 digits. Linear in len(expr).
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _SYMPY_TOKEN_RE.match(expr, pos)
        if m is None:  # a character sympy should not see (`_`, `.` after a name, `[`, `=`, ...)
            return False
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    inner = [1.0]  # per open parenthesis: the largest effective exponent inside it
    closed = 1.0  # that of the group just closed (the base when `)` precedes a power)
    for i, (kind, text) in enumerate(tokens):
        prev = tokens[i - 1] if i else ("op", "")
        if kind == "num" and len(text) > _MAX_NUMBER_CHARS:
            return False
        if kind == "name" and prev[1] == ".":
            return False
        if text == "(":
            inner.append(1.0)
        elif text == ")":
            if len(inner) == 1:
                return False
            closed = inner.pop()
            inner[-1] = max(inner[-1], closed)
        elif text in ("**", "^"):
            if prev[1] == ")":
                base = closed
            elif prev[0] in ("num", "name"):
                base = 1.0
            else:  # `!**`, `+**`: refuse rather than reason about it
                return False
            j = i + 1
            while j < len(tokens) and tokens[j][1] in ("+", "-"):
                j += 1
            if j >= len(tokens):
                return False
            exp_kind, exp = tokens[j]
            after = tokens[j + 1] if j + 1 < len(tokens) else ("op", "")
            if after[0] != "op" or after[1] in ("**", "^", "!", "("):  # towers, 9^9!, 9^x(..), 9^2 9
                return False
            if exp_kind == "num":
                size = abs(float(exp))  # inf for 1e999: refused below
            elif exp_kind == "name" and len(exp) <= 2:  # a symbol: sympy keeps the power symbolic
                size = 1.0
            else:
                return False
            if not size * base <= _MAX_POWER:
                return False
            inner[-1] = max(inner[-1], size * base)
        elif text == "!":
            after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            if prev[0] != "num" or not prev[1].isdigit() or int(prev[1]) > _MAX_FACTORIAL:
                return False
            if after in ("!", "**", "^"):
                return False
    return True


def _sympy_equal(truth_elem: str, given_elem: str, deadline: float | None) -> bool:
    """mathruler's `are_equal_under_sympy(truth_elem, given_elem)`, behind the screen.

    Its own filter first (too many letters, `^{`, `^(`, `^99`: not equal, as in the paper), then
    integer against integer without sympy (same result: their difference is 0 only if equal),
    then the screen (`_GradeRefused`), then sympy: in the grader process when `deadline` is set.
    """
    expr = f"({truth_elem})-({given_elem})"
    if not _mr.should_allow_eval(expr):
        return False
    if _INT_RE.fullmatch(truth_elem) and _INT_RE.fullmatch(given_elem):
        return int(truth_elem) == int(given_elem)
    if not _bounded_for_sympy(expr.replace("^", "**")):
        raise _GradeRefused
    if deadline is None:
        return bool(_mr.are_equal_under_sympy(truth_elem, given_elem))
    return bool(_run_limited(_mr.are_equal_under_sympy, (truth_elem, given_elem), deadline - time.monotonic()))


def _mathruler_grade_screened(given: str, truth: str, deadline: float | None = None) -> bool:
    """`mathruler.grader.grade_answer(given, truth)` step for step (mathruler 0.1.0), with its sympy
    step replaced by `_sympy_equal`. Keep in step with mathruler's function when upgrading."""
    truth_mathd, given_mathd = _mr.normalize_answer(truth), _mr.normalize_answer(given)
    if truth_mathd == given_mathd:  # be at least as lenient as mathd
        return True
    truth_n, given_n = _mr._normalize(truth), _mr._normalize(given)
    if truth_n is None:
        return False
    if truth_n == given_n:
        return True
    if len(given_n) == 0:
        return False
    truth_elems, given_elems = _mr.split_tuple(truth_n), _mr.split_tuple(given_n)
    if len(truth_elems) > 1 and (truth_n[0] != given_n[0] or truth_n[-1] != given_n[-1]):
        return False
    if len(truth_elems) != len(given_elems):
        return False
    for t, g in zip(truth_elems, given_elems):
        if _mr._is_frac(t) and _mr._is_frac(g):  # unreduced fractions must match as written
            ok = t == g
        elif _mr._str_is_int(t) != _mr._str_is_int(g):  # an integer truth needs a strict match
            ok = False
        else:
            ok = _sympy_equal(t, g, deadline)
        if not ok:
            return False
    return True


def _grade(given: str, truth: str, timeout_s: float | None = None) -> bool:
    """`given` equals `truth` by the paper's grader (or the built-in one without mathruler).

    timeout_s: the hard limit on the slow parts (pylatexenc, sympy), which then run in a grader
    process; None or <= 0: no limit, all in this process (the input limits still apply).
    Raises `_GradeTimeout` or `_GradeRefused`.
    """
    if _mathruler_grade is None:
        return _builtin_grade(given, truth)
    if _mr.normalize_answer(truth) == _mr.normalize_answer(given):  # string ops only: the common case
        return True
    if timeout_s is None or timeout_s <= 0:
        return _mathruler_grade_screened(given, truth)
    if "\\" in given or "\\" in truth:  # mathruler's `_normalize` runs pylatexenc on it
        return bool(_run_limited(_mathruler_grade_screened, (given, truth), timeout_s))
    return _mathruler_grade_screened(given, truth, time.monotonic() + timeout_s)


# --- the grader process -----------------------------------------------------------------------

# Runs in a fresh `python -c`: imports this module (sympy, mathruler) once, then answers jobs
# `(function, args)` from the parent until the pipe closes. Jobs are pickled by the parent only.
_WORKER_MAIN = """
import logging, signal, sys
sys.path.insert(0, sys.argv[3])
from multiprocessing.connection import Connection
logging.disable(logging.WARNING)  # pylatexenc logs a warning for every malformed macro
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pipe
import pebr.rewards.answer
try:  # a job may use at most GRADER_MEMORY_BYTES more address space than the process holds now
    import resource
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    limit = held + int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
except (ImportError, OSError, ValueError):  # no /proc (macOS) or no rlimits (Windows): time limit only
    pass
jobs, results = Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
results.send("ready")
while True:
    try:
        fn, args = jobs.recv()
    except (EOFError, OSError):
        break
    try:
        reply = ("ok", fn(*args))
    except BaseException as exc:
        reply = ("raised", type(exc).__name__)
    results.send(reply)
"""
# What one grading job may allocate beyond what the grader process holds after its imports: a
# huge expression (sympy expanding a product, a big-integer power) raises MemoryError in the
# grader, scored 0, instead of taking the training run's memory (Linux: RLIMIT_AS).
GRADER_MEMORY_BYTES = 2 << 30
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Worker:
    """One grader process and the two pipes to it."""

    def __init__(self) -> None:
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN, str(job_r), str(result_w), _PACKAGE_PARENT,
                 str(GRADER_MEMORY_BYTES)],
                pass_fds=(job_r, result_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(job_w)
            os.close(result_r)
            raise
        finally:
            os.close(job_r)
            os.close(result_w)
        self.jobs = Connection(job_w, readable=False)
        self.results = Connection(result_r, writable=False)
        try:
            ready = self.results.poll(_WORKER_STARTUP_S) and self.results.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise RuntimeError(f"the grader process did not start (exit code {self.proc.returncode})")

    def close(self) -> None:
        """Kill the process (it may be inside a long C call) and close the pipes."""
        self.proc.kill()
        self.proc.wait()
        self.jobs.close()
        self.results.close()


_pool_lock = threading.Lock()
_idle: list[_Worker] = []
_worker_error: str | None = None  # set when a grader process cannot be started here


def _forget_workers() -> None:
    """In a forked child: the parent's grader processes are the parent's (its pipes are shared)."""
    global _pool_lock, _idle
    _pool_lock, _idle = threading.Lock(), []


def _close_idle_workers() -> None:
    with _pool_lock:
        workers, _idle[:] = list(_idle), []
    for w in workers:
        w.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
atexit.register(_close_idle_workers)


def _run_limited(fn: Callable, args: tuple, timeout_s: float) -> Any:
    """`fn(*args)` in a grader process, killed after `timeout_s` seconds; works from any thread.

    fn and args must pickle (a module-level function). An idle process is reused, or a new one
    started (about 1 s, not counted in `timeout_s`). Raises `_GradeTimeout` past the limit or when
    the process dies, `_GradeRefused` or `_GradeError` when `fn` raised. Where no process can be
    started (a sandbox), `fn` runs in this process, with a warning, once.
    """
    global _worker_error
    if timeout_s <= 0:  # the deadline passed on an earlier element of a tuple answer
        raise _GradeTimeout
    with _pool_lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        if _worker_error is None:
            try:
                worker = _Worker()
            except Exception as exc:  # pragma: no cover - depends on the environment
                _worker_error = repr(exc)
                warnings.warn(f"answer grading without a time limit: no grader process ({_worker_error})")
        if worker is None:
            return fn(*args)
    try:
        worker.jobs.send((fn, args))
        if not worker.results.poll(max(0.0, timeout_s)):
            worker.close()
            raise _GradeTimeout
        status, value = worker.results.recv()
    except (EOFError, OSError):  # the process died (out of memory, a crash in C code)
        worker.close()
        raise _GradeTimeout from None
    except BaseException:  # KeyboardInterrupt while waiting, an unpicklable job
        worker.close()
        raise
    with _pool_lock:
        keep = len(_idle) < _MAX_IDLE_WORKERS
        if keep:
            _idle.append(worker)
    if not keep:
        worker.close()
    if status == "raised":
        raise _GradeRefused if value == "_GradeRefused" else _GradeError(value)
    return value


_warned_builtin = False


def accuracy_reward(
    response: Any, answer: Any, *, timeout_s: float = GRADE_TIMEOUT_S, failures: RewardFailures | None = None
) -> float:
    """1.0 if the final-answer line matches `answer`, else 0.0.

    The final-answer line is the text after `### The final answer is:` to the line end; a response
    without that header is graded whole (stripped), as the paper's `accuracy_reward` does, and
    counted in `failures.no_answer`. Graded by `mathruler.grader.grade_answer` (the paper's
    grader: `3.0`, `\\boxed{3}`, `$3$` equal 3; words compare case-insensitively) under
    `timeout_s`, a hard limit from any thread (the slow parts run in a grader process that is
    killed at the limit; None or <= 0: no limit); when mathruler cannot be imported (it needs
    pylatexenc), by a built-in exact/numeric comparison (`GRADER` says which).

    Scored 0 without evaluation and counted in `failures.grader_refused`: an answer line longer
    than max(512, 4 x the truth) characters, one using `**` or `!` where the truth does not, and
    one whose sympy input fails `_bounded_for_sympy` (`9^+9999999`, `(9^99)^99`, `2^+2^+2`).
    A headerless response over the length limit is not counted twice (it is in `no_answer`).
    Past the limit: 0, counted in `failures.grader_timeout`.
    """
    global _warned_builtin
    text = as_text(response)
    if text is None:
        count_failure(failures, "not_text")
        return 0.0
    given = extract_answer(text)
    has_header = given is not None
    if given is None:
        count_failure(failures, "no_answer")
        given = text.strip()
    truth = "" if answer is None else str(answer).strip()
    if len(given) > max(_MAX_ANSWER_CHARS, 4 * len(truth)):
        if has_header:
            count_failure(failures, "grader_refused")
        return 0.0
    given = _unbox(given)
    if not given or not truth:
        return 0.0
    if any(op in given and op not in truth for op in _HUGE_NUMBER_OPS):
        count_failure(failures, "grader_refused")
        return 0.0
    if _mathruler_grade is None and not _warned_builtin:
        _warned_builtin = True
        warnings.warn(f"mathruler grader unavailable ({_GRADER_IMPORT_ERROR}); using the built-in grader")
    try:
        return 1.0 if _grade(given, truth, timeout_s=timeout_s) else 0.0
    except _GradeTimeout:
        count_failure(failures, "grader_timeout")
        return 0.0
    except _GradeRefused:
        count_failure(failures, "grader_refused")
        return 0.0
    except Exception:  # a grader bug on odd input is a wrong answer, not a crashed run
        return 0.0
