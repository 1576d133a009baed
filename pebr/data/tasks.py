"""Built-in visual tasks with exact answers, made from procedural scenes (`pebr.data.scenes`).

Perception items ask for one fact that is in the pixels (a colour, a shape, a count, a digit,
a position, a bar's value). Reasoning items need several such facts plus arithmetic or a
comparison (sum of digits, largest minus smallest digit, difference of two bars, tallest bar,
most frequent colour, shapes left after removing a colour). Answers are one number or one word.

Every item carries the paper's record fields (`problem`, `answer`, `key_words`, the image) plus
a reference response in the structured format, derived from the scene, for the warm-up SFT.
Items are deterministic: item `i` of seed `s` depends only on `(s, i)`, so a shorter list is a
prefix of a longer one with the same seed.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from pebr.data import prompts
from pebr.data.scenes import (
    DIFFICULTIES,
    Difficulty,
    Scene,
    SceneObject,
    describe,
    difficulty_of,
    horizontal_position,
    key_words,
    random_scene,
    render,
    vertical_position,
)


@dataclass
class TaskItem:
    id: str
    image: Image.Image
    problem: str
    answer: str
    key_words: list[str]
    task_type: str  # e.g. "perception/colour", "reasoning/digit_sum"
    kind: str  # "perception" | "reasoning"
    reference_response: str
    scene: dict | None  # Scene.to_dict() for built-in items, None for loaded data
    # Images after the first, in the order the record lists them (EasyR1-style rows can carry
    # several); the prompt shows every image, then the text. Built-in items have one image.
    extra_images: list[Image.Image] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the item, first one first."""
        return [self.image, *self.extra_images]


@dataclass
class _Spec:
    """What a task generator returns: the question, its answer and the reference reasoning."""

    scene: Scene
    problem: str
    answer: str
    rationale: str
    steps: list[str]


_Generator = Callable[[random.Random, Difficulty], "_Spec | None"]


def _scene(rng: random.Random, d: Difficulty, kind: str, least: int = 1) -> Scene:
    """A random scene of `kind` at difficulty `d` with at least `least` objects (a task that
    compares objects needs several, whatever the difficulty's range)."""
    lo, hi = d.objects(kind)
    if lo >= least:
        return random_scene(rng, kind=kind, difficulty=d)
    return random_scene(rng, kind=kind, difficulty=d, n_objects=rng.randint(least, max(hi, least)))


def _unique(objects: list[SceneObject], key: Callable[[SceneObject], object]) -> list[SceneObject]:
    """Objects whose `key` no other object shares (so a question can name them unambiguously)."""
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def _name(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.noun}"


# ---------------------------------------------------------------------------------------------
# Perception: one fact from the image.


def _colour(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "shapes")
    choices = _unique(scene.objects, lambda o: o.shape)
    if not choices:
        return None
    obj = rng.choice(choices)
    return _Spec(scene, f"What colour is the {obj.shape}?", obj.colour,
                 f"Find the only {obj.shape} and read its colour.", [f"The {obj.shape} is {obj.colour}."])


def _shape(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "shapes")
    choices = _unique(scene.objects, lambda o: o.colour)
    if not choices:
        return None
    obj = rng.choice(choices)
    return _Spec(scene, f"What shape is the {obj.colour} object?", obj.shape,
                 f"Find the only {obj.colour} object and name its shape.", [f"The {obj.colour} object is a {obj.shape}."])


def _count(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "shapes")
    n = len(scene.objects)
    return _Spec(scene, "How many shapes are in the image?", str(n),
                 "Count every shape.", [f"There are {n} shapes."])


def _digit(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "digits")
    choices = _unique(scene.objects, _name)
    if not choices:
        return None
    obj = rng.choice(choices)
    if obj.shape is None:
        problem, where = f"What is the {obj.colour} digit?", f"The {obj.colour} digit"
    else:
        problem, where = f"What digit is in the {obj.colour} {obj.shape}?", f"The digit in the {obj.colour} {obj.shape}"
    return _Spec(scene, problem, str(obj.digit), "Find the object and read its digit.", [f"{where} is {obj.digit}."])


def _position(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "shapes")
    horizontal = rng.random() < 0.5
    choices = [o for o in _unique(scene.objects, _name) if (o.col if horizontal else o.row) != 1]
    if not choices:
        return None
    obj = rng.choice(choices)
    if horizontal:
        problem, answer = f"Is the {_name(obj)} on the left or the right?", horizontal_position(obj)
    else:
        problem, answer = f"Is the {_name(obj)} at the top or the bottom?", vertical_position(obj)
    return _Spec(scene, problem, answer, f"Locate the {_name(obj)} in the image.", [f"The {_name(obj)} is at the {answer}."])


def _bar_value(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "bars")
    bar = rng.choice(scene.bars)
    return _Spec(scene, f"What is the value of the {bar.colour} bar?", str(bar.value),
                 "Read the bar's height on the grid.", [f"The {bar.colour} bar reaches {bar.value}."])


# ---------------------------------------------------------------------------------------------
# Reasoning: several facts, then arithmetic or a comparison.


def _digit_sum(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "digits", least=2)
    digits = scene.digits
    total = sum(digits)
    return _Spec(scene, "What is the sum of all the digits?", str(total), "Read every digit, then add them.",
                 [f"The digits are {', '.join(map(str, digits))}.", f"{' + '.join(map(str, digits))} = {total}."])


def _digit_range(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "digits", least=2)
    hi, lo = max(scene.digits), min(scene.digits)
    return _Spec(scene, "What is the largest digit minus the smallest digit?", str(hi - lo),
                 "Read every digit, take the largest and the smallest.",
                 [f"The largest digit is {hi}, the smallest is {lo}.", f"{hi} - {lo} = {hi - lo}."])


def _bar_diff(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "bars", least=2)
    a, b = rng.sample(scene.bars, 2)
    if a.value == b.value:
        return None
    if a.value < b.value:
        a, b = b, a
    d = a.value - b.value
    return _Spec(scene, f"How much higher is the {a.colour} bar than the {b.colour} bar?", str(d),
                 "Read both bars, then subtract.",
                 [f"The {a.colour} bar is {a.value}, the {b.colour} bar is {b.value}.", f"{a.value} - {b.value} = {d}."])


def _bar_max(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "bars", least=2)
    values = [b.value for b in scene.bars]
    top = max(values)
    if values.count(top) != 1:
        return None
    best = scene.bars[values.index(top)]
    listed = ", ".join(f"{b.colour} {b.value}" for b in scene.bars)
    return _Spec(scene, "Which colour is the highest bar?", best.colour, "Read every bar and compare.",
                 [f"The bars are {listed}.", f"The highest is {best.colour} with {top}."])


def _colour_most(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "shapes", least=3)
    counts = Counter(o.colour for o in scene.objects).most_common()
    if counts[0][1] < 2 or (len(counts) > 1 and counts[1][1] == counts[0][1]):
        return None
    listed = ", ".join(f"{c} {n}" for c, n in counts)
    return _Spec(scene, "Which colour appears most often?", counts[0][0], "Count the shapes of each colour.",
                 [f"Counts: {listed}.", f"The most common colour is {counts[0][0]}."])


def _count_remove(rng: random.Random, d: Difficulty) -> _Spec | None:
    scene = _scene(rng, d, "shapes", least=3)
    colour = rng.choice(scene.objects).colour
    total, removed = len(scene.objects), sum(o.colour == colour for o in scene.objects)
    left = total - removed
    return _Spec(scene, f"If all {colour} shapes are removed, how many shapes are left?", str(left),
                 f"Count all shapes and the {colour} ones, then subtract.",
                 [f"There are {total} shapes, {removed} of them {colour}.", f"{total} - {removed} = {left}."])


PERCEPTION_TASKS: dict[str, _Generator] = {
    "perception/colour": _colour,
    "perception/shape": _shape,
    "perception/count": _count,
    "perception/digit": _digit,
    "perception/position": _position,
    "perception/bar_value": _bar_value,
}
REASONING_TASKS: dict[str, _Generator] = {
    "reasoning/digit_sum": _digit_sum,
    "reasoning/digit_range": _digit_range,
    "reasoning/bar_diff": _bar_diff,
    "reasoning/bar_max": _bar_max,
    "reasoning/colour_most": _colour_most,
    "reasoning/count_remove": _count_remove,
}
TASKS: dict[str, _Generator] = {**PERCEPTION_TASKS, **REASONING_TASKS}
TASK_TYPES = tuple(TASKS)
ITEM_KINDS = ("mixed", "perception", "reasoning")
_MAX_TRIES = 200  # a generator rejects scenes that cannot be asked about unambiguously


def _types_for(kind: str, task_types: list[str] | None) -> list[str]:
    if task_types is not None:
        unknown = [t for t in task_types if t not in TASKS]
        if unknown or not task_types:
            raise ValueError(f"task_types: unknown {unknown} (known: {list(TASKS)})")
        return list(task_types)
    if kind == "perception":
        return list(PERCEPTION_TASKS)
    if kind == "reasoning":
        return list(REASONING_TASKS)
    if kind == "mixed":  # alternate, so any even prefix is half perception, half reasoning
        return [t for pair in zip(PERCEPTION_TASKS, REASONING_TASKS) for t in pair]
    raise ValueError(f"kind: expected one of {ITEM_KINDS}, got {kind!r}")


def _level_name(level: Difficulty) -> str:
    return next((name for name, d in DIFFICULTIES.items() if d == level), "custom")


def make_item(seed: int, index: int, task_type: str, *, image_size: int = 112,
              difficulty: "str | Difficulty" = "standard") -> TaskItem:
    """Item `index` of `seed` for one task type (deterministic in `(seed, index, task_type,
    difficulty)`). Ids: `s{seed}-{index}` at the standard difficulty, `{level}-s{seed}-{index}`
    at another (so a sampling cache of one world is never reused for another)."""
    level = difficulty_of(difficulty)
    name = _level_name(level)
    rng = random.Random(f"pebr/{seed}/{index}")  # str seeds hash with SHA-512: stable across runs
    generator = TASKS[task_type]
    for _ in range(_MAX_TRIES):
        spec = generator(rng, level)
        if spec is not None:
            break
    else:  # pragma: no cover - every generator accepts a large share of scenes
        raise RuntimeError(f"{task_type}: no suitable scene in {_MAX_TRIES} tries")
    response = prompts.format_response(describe(spec.scene), spec.rationale, spec.steps, spec.answer)
    return TaskItem(
        id=f"{'' if name == 'standard' else name + '-'}s{seed}-{index:06d}",
        image=render(spec.scene, image_size),
        problem=spec.problem,
        answer=spec.answer,
        key_words=key_words(spec.scene),
        task_type=task_type,
        kind=task_type.split("/")[0],
        reference_response=response,
        scene=spec.scene.to_dict(),
    )


def generate_items(
    n: int, *, seed: int, kind: str = "mixed", image_size: int = 112, task_types: list[str] | None = None,
    difficulty: "str | Difficulty" = "standard",
) -> list[TaskItem]:
    """`n` built-in items, deterministic given `seed`.

    kind: "mixed" (perception and reasoning alternate), "perception" or "reasoning"; item `i`
    has task type `types[i % len(types)]`, so every type appears once `n >= len(types)`.
    image_size: side of the square images in pixels (a multiple of 28 suits Qwen2.5-VL).
    task_types: restrict to these types (overrides `kind`).
    difficulty: objects per scene and colours (pebr.data.scenes.DIFFICULTIES names: standard, simple).
    """
    if int(n) < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    if int(image_size) < 28:
        raise ValueError(f"image_size: expected >= 28, got {image_size}")
    types = _types_for(kind, task_types)
    level = difficulty_of(difficulty)
    return [make_item(seed, i, types[i % len(types)], image_size=image_size, difficulty=level) for i in range(int(n))]


__all__ = [
    "TaskItem", "generate_items", "make_item", "TASK_TYPES", "TASKS", "PERCEPTION_TASKS", "REASONING_TASKS",
    "ITEM_KINDS",
]


def task_corpus(*, n_items: int = 600, seed: int = 12345) -> list[str]:
    """Prompts and reference responses of procedural tasks: the text the tiny policy reads and
    writes, which its tokenizer is learned from. A seed of its own, so the tokenizer does not
    depend on a training run."""
    texts = []
    for kind in ("perception", "reasoning"):
        for item in generate_items(n_items // 2, seed=seed, kind=kind):
            texts.append(prompts.build_prompt(item.problem))
            texts.append(item.reference_response)
    return texts
