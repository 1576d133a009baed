"""Rewards of the two PeBR-R1 stages (the paper's `pebr_1.py` / `pebr_2.py`), hardened.

Stage 1, perception: `0.4*clip + 0.4*keyword + 0.1*format + 0.1*length`.
Stage 2, reasoning:  `0.9*accuracy + 0.1*format`.

Every component is a plain function of the response text that returns a float in [0, 1] and
never raises on any response: None, bytes, binary junk and megabyte strings score 0 on the parts
they break. Parsing is linear in the response length (no regex with nested lazy scans), and the
answer grader runs under a time limit, because sympy can hang on a pathological expression.

Where this departs from the paper's reward code, and why:
- A response without `### The final answer is:` scores accuracy 0 (the paper grades the whole
  response then): such a response is malformed, and grading arbitrary text with sympy is the
  hang risk. It is counted in `RewardFailures.no_answer`.
- `\\boxed{x}` in the answer line is unwrapped before grading (mathruler alone already accepts
  `\\boxed{3}` for 3; this also covers `\\boxed{red}`).
- Keywords are not searched in the section headers, and numeric keywords must stand alone
  (the paper's substring test finds "1" in every response, in "### Step 1:").
- The answer header is matched like the format reward matches it (case-insensitive, any spaces
  after `###`), so format and accuracy agree on what a header is.
- CLIP: `min(1, cos/0.4)` is also clamped at 0 (a negative cosine gave a negative reward).
- Built-in items have an exact scene, so without a CLIP model `scene_reward` (precision/recall
  of the described objects against the scene) takes the clip term's weight, under key "scene".
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from pebr.scenes import COLOURS, SHAPES, Scene

try:  # the paper's grader; needs pylatexenc (a dependency mathruler does not declare)
    from mathruler.grader import grade_answer as _mathruler_grade
    GRADER = "mathruler"
except Exception as _exc:  # pragma: no cover - depends on the environment
    _mathruler_grade = None
    GRADER = "builtin"
    _GRADER_IMPORT_ERROR = repr(_exc)

CLIP_SCALE = 0.4  # cos >= 0.4 gives the full clip reward (paper)
GRADE_TIMEOUT_S = 2.0
_MAX_ANSWER_CHARS = 512  # a longer "final answer" cannot be a short ground truth; skip sympy
_MAX_PARSE_CHARS = 20_000  # descriptions are parsed for scene_reward up to this length
# Operators that build astronomically large integers (`9**9**9**9`, `99999!`) in C code that no
# alarm can interrupt and that hold the GIL. An answer using one where the ground truth does not
# is graded wrong without evaluation (mathruler already refuses `^{`, `^(` and `^99`).
_HUGE_NUMBER_OPS = ("**", "!")

_HEADER_RE = {
    "description": re.compile(r"###\s*Image Description:", re.IGNORECASE),
    "rationales": re.compile(r"###\s*Rationales:", re.IGNORECASE),
    "step1": re.compile(r"###\s*Step\s*1:", re.IGNORECASE),
    "answer": re.compile(r"###\s*The final answer is:", re.IGNORECASE),
}

_SPACE_RE = re.compile(r"\s*")
_ANY_HEADER_RE = re.compile(
    r"###\s*(?:Image Description:|Rationales:|Let's think step by step\.?|Step\s*\d+:|The final answer is:)",
    re.IGNORECASE,
)

# ---------------------------------------------------------------------------------------------
# Failures


@dataclass
class RewardFailures:
    """How many responses could not be scored on some part (for logging; pass `failures=`).

    not_text: the response was None or not text. no_description: no description section (the
    clip/scene term scored 0). no_answer: no final-answer line (accuracy 0). grader_timeout: the
    grader ran past its time limit (accuracy 0). scorer_error: the CLIP scorer raised (clip 0).
    """

    not_text: int = 0
    no_description: int = 0
    no_answer: int = 0
    grader_timeout: int = 0
    scorer_error: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def total(self) -> int:
        return sum(self.as_dict().values())

    def add(self, other: "RewardFailures") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# Process-wide tally of every failure counted by any reward call (read and `reset_failures()`
# per step to log how many responses were unparseable, without threading a counter through).
FAILURES = RewardFailures()


def reset_failures() -> dict[str, int]:
    """The process-wide tally so far, then zero it."""
    counts = FAILURES.as_dict()
    for f in fields(FAILURES):
        setattr(FAILURES, f.name, 0)
    return counts


def _count(failures: RewardFailures | None, name: str) -> None:
    setattr(FAILURES, name, getattr(FAILURES, name) + 1)
    if failures is not None:
        setattr(failures, name, getattr(failures, name) + 1)


def _as_text(response: Any) -> str | None:
    """The response as str, or None when it is not text (bytes are decoded leniently)."""
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray, memoryview)):
        return bytes(response).decode("utf-8", errors="replace")
    return None


# ---------------------------------------------------------------------------------------------
# Parsing


def extract_description(response: Any) -> str | None:
    """Text between `### Image Description:` and the next `### Rationales:`, stripped.

    None when either header is missing (the paper's regex then yields an empty caption).
    """
    text = _as_text(response)
    if text is None:
        return None
    start = _HEADER_RE["description"].search(text)
    if start is None:
        return None
    end = _HEADER_RE["rationales"].search(text, start.end())
    if end is None:
        return None
    return text[start.end():end.start()].strip()


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


def extract_answer(response: Any) -> str | None:
    """The text after the first `### The final answer is:` (skipping blank space and line
    breaks, as the paper's `\\s*` does) up to the end of that line, stripped; None if absent."""
    text = _as_text(response)
    if text is None:
        return None
    match = _HEADER_RE["answer"].search(text)
    if match is None:
        return None
    i = _SPACE_RE.match(text, match.end()).end()
    end = text.find("\n", i)
    return text[i: len(text) if end < 0 else end].strip()


# ---------------------------------------------------------------------------------------------
# Components


def format_reward(response: Any) -> float:
    """1.0 if `### Image Description:`, `### Rationales:`, `### Step 1:` and
    `### The final answer is:` all appear (any order, any case, as in the paper), else 0.0."""
    text = _as_text(response)
    if text is None:
        return 0.0
    return 1.0 if all(p.search(text) for p in _HEADER_RE.values()) else 0.0


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
    text = _as_text(response)
    words = _as_keywords(key_words)
    if text is None or not words:
        return 0.0
    # Headers are format, not content: without this, the key word "1" is in every response
    # ("### Step 1:"), and "description" or "answer" would be too.
    lowered = _ANY_HEADER_RE.sub(" ", text).lower()
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


# --- accuracy --------------------------------------------------------------------------------


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

    Graded by `mathruler.grader.grade_answer` (the paper's grader: `3.0`, `\\boxed{3}`, `$3$`
    equal 3; words compare case-insensitively) under `timeout_s`; when mathruler cannot be
    imported (it needs pylatexenc), by a built-in exact/numeric comparison (`GRADER` says which).
    """
    global _warned_builtin
    text = _as_text(response)
    if text is None:
        _count(failures, "not_text")
        return 0.0
    given = extract_answer(text)
    if given is None:
        _count(failures, "no_answer")
        return 0.0
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
        _count(failures, "grader_timeout")
        return 0.0
    except Exception:  # a grader bug on odd input is a wrong answer, not a crashed run
        return 0.0


# --- scene (the CLIP substitute for built-in items) ------------------------------------------

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
        _count(failures, "not_text" if _as_text(response) is None else "no_description")
        return 0.0
    truth_pairs, truth_numbers = _scene_facts(scene)
    pairs, numbers = _mentioned_facts(description)
    score = _f1(pairs, truth_pairs) if truth_pairs else 0.0
    if truth_numbers:
        score = 0.5 * (score + _f1(numbers, truth_numbers))
    return float(min(1.0, max(0.0, score)))


# --- CLIP ------------------------------------------------------------------------------------

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """Cosine similarity of texts and images under a CLIP-family model from a LOCAL folder.

    Any `transformers` model with `get_image_features` / `get_text_features` works (CLIP,
    SigLIP, FG-CLIP with trust_remote_code...). Images are preprocessed here with Pillow and
    torch from the folder's `preprocessor_config.json` (CLIP style: resize the short side, centre
    crop; SigLIP style, `size` with height/width and no crop: resize to the square), rescale by
    1/255, normalise, because the torchvision-backed processors do not import beside the CPU
    torch. Nothing is downloaded.
    """

    def __init__(self, model, tokenizer, *, image_size: int, mean, std, resize_to: int | None = None,
                 crop: bool = True, max_text_length: int = 77, pad_to_max_length: bool = False,
                 device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.resize_to = int(resize_to or image_size)
        self.crop = bool(crop)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_text_length = int(max_text_length)
        self.pad_to_max_length = bool(pad_to_max_length)  # SigLIP was trained on max-length padding
        self.device = device
        # Image features of recent images: the n responses of a GRPO group share one image
        # object, so per-response calls encode it once. Keyed by id(); the entry keeps the
        # image alive, so its id cannot be reused while cached. (Do not edit images in place.)
        self._image_cache: dict[int, tuple[object, object]] = {}
        self._image_cache_size = 64

    @classmethod
    def from_pretrained(cls, folder: str, *, device: str = "cpu", trust_remote_code: bool = False) -> "ClipScorer":
        """Load model, tokenizer and preprocessing from `folder` (local files only)."""
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder: no CLIP model folder at {folder!r}")
        model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(f"folder: {type(model).__name__} has no get_image_features/get_text_features")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        vision = getattr(model.config, "vision_config", None)
        image_size = getattr(vision, "image_size", None) or 224
        mean, std, resize_to, crop = _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD, None, True
        pre = os.path.join(folder, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre, encoding="utf-8") as f:
                cfg = json.load(f)
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            size, crop_size = cfg.get("size"), cfg.get("crop_size")
            crop = bool(cfg.get("do_center_crop", crop_size is not None))
            if isinstance(crop_size, dict):
                image_size = crop_size.get("height", image_size)
            elif isinstance(crop_size, int):
                image_size = crop_size
            if isinstance(size, dict):
                resize_to = size.get("shortest_edge") or size.get("height")
            elif isinstance(size, int):
                resize_to = size
            if not crop and resize_to:
                image_size = resize_to
        text_cfg = getattr(model.config, "text_config", None)
        max_len = getattr(text_cfg, "max_position_embeddings", None) or 77
        pad_max = "siglip" in str(getattr(model.config, "model_type", "")).lower()
        return cls(model, tokenizer, image_size=image_size, mean=mean, std=std, resize_to=resize_to, crop=crop,
                   max_text_length=max_len, pad_to_max_length=pad_max, device=device)

    def _pixels(self, images):
        import numpy as np
        import torch
        from PIL import Image

        batch = []
        for image in images:
            image = image.convert("RGB")
            if self.crop:
                w, h = image.size
                scale = self.resize_to / min(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
                w, h = image.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                image = image.crop((left, top, left + self.image_size, top + self.image_size))
            else:
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            batch.append(np.asarray(image, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @staticmethod
    def _features(out):
        import torch

        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out[0]

    def image_features(self, images: list):
        """[len(images), D] fp32 image features (cached per image object)."""
        import torch

        missing = [im for im in images if id(im) not in self._image_cache]
        if missing:
            with torch.no_grad():
                feats = self._features(self.model.get_image_features(pixel_values=self._pixels(missing))).float()
            for im, f in zip(missing, feats):
                if len(self._image_cache) >= self._image_cache_size:
                    self._image_cache.pop(next(iter(self._image_cache)))
                self._image_cache[id(im)] = (im, f)
        return torch.stack([self._image_cache[id(im)][1] for im in images])

    def similarity(self, texts: list[str], images: list) -> list[float]:
        """cos(text_i, image_i) for each pair; `images` may hold one image for all texts
        (the group case: one prompt image, n descriptions), which is then encoded once."""
        import torch

        if len(images) not in (1, len(texts)):
            raise ValueError(f"images: expected 1 or {len(texts)} images, got {len(images)}")
        if not texts:
            return []
        with torch.no_grad():
            img = self.image_features(images)
            padding = "max_length" if self.pad_to_max_length else True
            tok = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_text_length,
                                 return_tensors="pt")
            # SigLIP pools the last position and was trained on unmasked max-length padding,
            # so it gets no attention mask (its own processor returns none).
            keys = ("input_ids",) if self.pad_to_max_length else ("input_ids", "attention_mask")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in keys}
            try:
                out = self.model.get_text_features(**tok)
            except TypeError:  # remote-code models (FG-CLIP) that take input_ids only
                out = self.model.get_text_features(tok["input_ids"])
            txt = self._features(out).float()
            img = torch.nn.functional.normalize(img, dim=-1)
            txt = torch.nn.functional.normalize(txt, dim=-1)
            return (txt * img.expand_as(txt)).sum(-1).tolist()


def clip_score_to_reward(cos: float) -> float:
    """min(1, cos/0.4), clamped at 0 (the paper's scale)."""
    if not isinstance(cos, (int, float)) or math.isnan(cos):
        return 0.0
    return float(min(1.0, max(0.0, cos / CLIP_SCALE)))


def clip_reward(response: Any, image, scorer: ClipScorer, *, failures: RewardFailures | None = None) -> float:
    """`min(1, cos/0.4)` of the image description against `image` (0 without a description)."""
    return clip_rewards([response], image, scorer, failures=failures)[0]


def clip_rewards(responses: list, image, scorer: ClipScorer, *, failures: RewardFailures | None = None) -> list[float]:
    """`clip_reward` for a group of responses to one image (the image is encoded once)."""
    descriptions = [extract_description(r) for r in responses]
    for r, d in zip(responses, descriptions):
        if d is None:
            _count(failures, "not_text" if _as_text(r) is None else "no_description")
    scored = [i for i, d in enumerate(descriptions) if d]
    out = [0.0] * len(responses)
    if not scored:
        return out
    try:
        cos = scorer.similarity([descriptions[i] for i in scored], [image])
    except Exception:  # a scorer failure costs this group its clip term, not the run
        for _ in scored:
            _count(failures, "scorer_error")
        return out
    for i, c in zip(scored, cos):
        out[i] = clip_score_to_reward(c)
    return out


# ---------------------------------------------------------------------------------------------
# Stage rewards


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
    clip_score: float | None = None,
) -> dict[str, float]:
    """Stage-1 reward of one response: {"overall", "clip" or "scene", "keyword", "format", "length"}.

    item: a TaskItem (uses `.image`, `.key_words`, `.scene`).
    num_tokens: the response length in tokens (for the length term).
    scorer: a ClipScorer; without one, built-in items use `scene_reward` (key "scene") and items
    without a scene drop the visual term, the others' weights renormalised to sum as before.
    clip_score: a precomputed clip reward (from `clip_rewards` on the whole group), used instead
    of calling the scorer.
    """
    term = visual_term(item, scorer) if clip_score is None else "clip"
    out = {
        "keyword": keyword_reward(response, getattr(item, "key_words", None)),
        "format": format_reward(response),
        "length": length_reward(num_tokens, weights.expected_length),
    }
    not_text = _as_text(response) is None
    if not_text:  # counted once here, not once per term
        _count(failures, "not_text")
    if term == "clip":
        if clip_score is not None:
            out["clip"] = float(clip_score)
        else:
            out["clip"] = 0.0 if not_text else clip_reward(response, item.image, scorer, failures=failures)
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


__all__ = [
    "GRADER", "RewardFailures", "FAILURES", "reset_failures", "extract_description", "extract_answer", "format_reward", "keyword_reward",
    "length_reward", "accuracy_reward", "scene_reward", "ClipScorer", "clip_score_to_reward", "clip_reward",
    "clip_rewards", "PerceptionWeights", "ReasoningWeights", "visual_term", "perception_reward", "reasoning_reward",
]
