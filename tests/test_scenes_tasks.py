"""Built-in scenes and tasks: determinism, answers recomputed from the scene, real pixels."""
import random
import re
from collections import Counter, deque

import numpy as np
import pytest

from pebr.data import prompts
from pebr.data.scenes import (
    COLOURS,
    MAX_BAR_VALUE,
    Scene,
    colour_point,
    describe,
    key_words,
    random_scene,
    render,
)
from pebr.data.tasks import PERCEPTION_TASKS, REASONING_TASKS, TASK_TYPES, generate_items


def _solve(task_type: str, problem: str, scene: Scene) -> str:
    """The answer recomputed from the scene and the question text alone (not the generator)."""
    objs, bars = scene.objects, {b.colour: b.value for b in scene.bars}

    def one(cands):
        assert len(cands) == 1, f"ambiguous question {problem!r}: {cands}"
        return cands[0]

    if task_type == "perception/colour":
        shape = re.fullmatch(r"What colour is the (\w+)\?", problem)[1]
        return one([o.colour for o in objs if o.shape == shape])
    if task_type == "perception/shape":
        colour = re.fullmatch(r"What shape is the (\w+) object\?", problem)[1]
        return one([o.shape for o in objs if o.colour == colour])
    if task_type == "perception/count":
        return str(len(objs))
    if task_type == "perception/digit":
        m = re.fullmatch(r"What is the (\w+) digit\?", problem)
        if m:
            return one([str(o.digit) for o in objs if o.colour == m[1] and o.shape is None])
        colour, shape = re.fullmatch(r"What digit is in the (\w+) (\w+)\?", problem).groups()
        return one([str(o.digit) for o in objs if o.colour == colour and o.shape == shape])
    if task_type == "perception/position":
        colour, noun, a, b = re.fullmatch(r"Is the (\w+) (\w+) (?:on|at) the (\w+) or the (\w+)\?", problem).groups()
        o = one([o for o in objs if o.colour == colour and o.noun == noun])
        words = ("left", "middle", "right") if a == "left" else ("top", "middle", "bottom")
        answer = words[o.col if a == "left" else o.row]
        assert answer in (a, b)
        return answer
    if task_type == "perception/bar_value":
        return str(bars[re.fullmatch(r"What is the value of the (\w+) bar\?", problem)[1]])
    if task_type == "reasoning/digit_sum":
        return str(sum(o.digit for o in objs))
    if task_type == "reasoning/digit_range":
        digits = [o.digit for o in objs]
        return str(max(digits) - min(digits))
    if task_type == "reasoning/bar_diff":
        a, b = re.fullmatch(r"How much higher is the (\w+) bar than the (\w+) bar\?", problem).groups()
        assert bars[a] > bars[b]
        return str(bars[a] - bars[b])
    if task_type == "reasoning/bar_max":
        top = max(bars.values())
        return one([c for c, v in bars.items() if v == top])
    if task_type == "reasoning/colour_most":
        counts = Counter(o.colour for o in objs)
        top = max(counts.values())
        return one([c for c, n in counts.items() if n == top])
    if task_type == "reasoning/count_remove":
        colour = re.fullmatch(r"If all (\w+) shapes are removed, how many shapes are left\?", problem)[1]
        assert any(o.colour == colour for o in objs)
        return str(sum(o.colour != colour for o in objs))
    raise AssertionError(f"no solver for {task_type}")


def _components(image) -> int:
    """Connected regions (4-neighbour) of non-white pixels."""
    a = np.asarray(image)
    mask = ~np.all(a == 255, axis=-1)
    seen = np.zeros_like(mask)
    h, w = mask.shape
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return n


def test_deterministic_by_seed_and_prefix_stable():
    a = generate_items(30, seed=11)
    b = generate_items(30, seed=11)
    c = generate_items(10, seed=11)
    d = generate_items(30, seed=12)
    key = lambda it: (it.id, it.problem, it.answer, it.key_words, it.reference_response, it.scene, it.image.tobytes())
    assert [key(x) for x in a] == [key(x) for x in b]
    assert [key(x) for x in a[:10]] == [key(x) for x in c]
    assert [key(x) for x in a] != [key(x) for x in d]


@pytest.mark.parametrize("kind, types", [("mixed", TASK_TYPES), ("perception", tuple(PERCEPTION_TASKS)),
                                         ("reasoning", tuple(REASONING_TASKS))])
def test_every_task_type_produced(kind, types):
    items = generate_items(len(types), seed=0, kind=kind)
    assert {it.task_type for it in items} == set(types)
    assert all(it.kind == it.task_type.split("/")[0] for it in items)
    if kind == "mixed":
        assert [it.kind for it in items[:4]] == ["perception", "reasoning", "perception", "reasoning"]


def test_task_types_filter_and_bad_arguments():
    items = generate_items(5, seed=0, task_types=["reasoning/bar_diff"])
    assert {it.task_type for it in items} == {"reasoning/bar_diff"}
    with pytest.raises(ValueError, match="task_types"):
        generate_items(2, seed=0, task_types=["perception/nope"])
    with pytest.raises(ValueError, match="kind"):
        generate_items(2, seed=0, kind="both")
    with pytest.raises(ValueError, match="n"):
        generate_items(-1, seed=0)
    assert generate_items(0, seed=0) == []


def test_answers_match_scene_ground_truth():
    for item in generate_items(240, seed=7):
        scene = Scene.from_dict(item.scene)
        assert item.answer == _solve(item.task_type, item.problem, scene), item
        assert re.fullmatch(r"\d+|[a-z]+", item.answer)  # one number or one word


def test_key_words_and_reference_response():
    for item in generate_items(48, seed=3):
        scene = Scene.from_dict(item.scene)
        colours = {o.colour for o in scene.objects} | {b.colour for b in scene.bars}
        assert colours <= set(item.key_words)
        assert {str(d) for d in scene.digits} <= set(item.key_words)
        assert {o.noun for o in scene.objects} <= set(item.key_words)
        assert len(item.key_words) == len(set(item.key_words))
        resp = item.reference_response
        assert len(resp) < 400, resp
        for header in prompts.REQUIRED_HEADERS:
            assert header in resp
        assert resp.rstrip().endswith(f"{prompts.ANSWER_HEADER} {item.answer}")
        assert describe(scene) in resp


@pytest.mark.parametrize("size", [56, 112, 224])
def test_images_are_real_pixels(size):
    for item in generate_items(24, seed=9, image_size=size):
        img = item.image
        assert img.mode == "RGB" and img.size == (size, size)
        a = np.asarray(img)
        scene = Scene.from_dict(item.scene)
        assert tuple(a[0, -1]) == (255, 255, 255)  # background corner
        n = len(scene.bars) if scene.kind == "bars" else len(scene.objects)
        for i in range(n):
            x, y = colour_point(scene, i, size)
            colour = (scene.bars[i] if scene.kind == "bars" else scene.objects[i]).colour
            assert tuple(a[y, x]) == COLOURS[colour], (item.task_type, i)
        # Exactly the scene's colours (plus white, black ink and grid grey) are painted.
        painted = {tuple(p) for p in a.reshape(-1, 3)} - {(255, 255, 255), (0, 0, 0), (215, 215, 215)}
        expected = {COLOURS[o.colour] for o in scene.objects} | {COLOURS[b.colour] for b in scene.bars}
        assert painted == expected


def test_shape_count_visible_as_separate_blobs():
    for item in generate_items(20, seed=1, task_types=["perception/count"]):
        assert _components(item.image) == int(item.answer)


@pytest.mark.parametrize("size", [112, 224])
def test_bar_values_readable_from_pixels(size):
    rng = random.Random(0)
    for _ in range(10):
        scene = random_scene(rng, kind="bars")
        a = np.asarray(render(scene, size))
        unit = (0.92 - 0.06) * size / (MAX_BAR_VALUE + 0.5)
        for i, bar in enumerate(scene.bars):
            x, _ = colour_point(scene, i, size)
            height = int(np.all(a[:, x] == COLOURS[bar.colour], axis=-1).sum())
            assert round(height / unit) == bar.value


def test_scene_dict_round_trip_and_validation():
    rng = random.Random(5)
    for kind in ("shapes", "digits", "bars"):
        scene = random_scene(rng, kind=kind)
        again = Scene.from_dict(scene.to_dict())
        assert again == scene
        assert np.array_equal(np.asarray(render(again, 84)), np.asarray(render(scene, 84)))
        assert key_words(scene) and describe(scene)
    with pytest.raises(ValueError, match="scene"):
        Scene.from_dict({"kind": "shapes", "objects": [{"shape": "hexagon", "colour": "red", "col": 0, "row": 0}]})
    with pytest.raises(ValueError, match="scene"):
        Scene.from_dict({"kind": "video"})
    with pytest.raises(ValueError, match="kind"):
        random_scene(rng, kind="video")
    with pytest.raises(ValueError, match="size"):
        render(scene, 8)


@pytest.mark.parametrize("bad", [
    {"kind": "shapes", "objects": [{"shape": "circle", "colour": "red", "col": 3, "row": 0}]},
    {"kind": "digits", "objects": [{"shape": None, "colour": "red", "col": 0, "row": 0}]},
    {"kind": "digits", "objects": [{"shape": None, "colour": "red", "col": 0, "row": 0, "digit": 12}]},
    {"kind": "shapes", "objects": [{"shape": "circle", "colour": "red", "col": 0, "row": 0, "size": 3}]},
    {"kind": "bars", "bars": [{"colour": "red", "value": 10}]},
    {"kind": "bars", "bars": [{"colour": "pink", "value": 1}]},
])
def test_scene_from_dict_rejects(bad):
    with pytest.raises(ValueError, match="scene"):
        Scene.from_dict(bad)


@pytest.mark.parametrize("size", [112, 224])
def test_every_shape_with_a_digit_renders_both(size):
    from pebr.data.scenes import SHAPES, _digit_box, _pixel_geometry

    objects = [{"shape": s, "colour": c, "col": i % 3, "row": i // 3, "digit": 8}
               for i, (s, c) in enumerate(zip(SHAPES, ["red", "yellow", "blue", "orange"]))]
    scene = Scene.from_dict({"kind": "digits", "objects": objects})
    a = np.asarray(render(scene, size))
    for i, o in enumerate(scene.objects):
        x, y = colour_point(scene, i, size)
        assert tuple(a[y, x]) == COLOURS[o.colour]
        # Inside the glyph's box (which lies inside the shape) there is ink (white on dark fills,
        # black on light ones) and fill between the strokes.
        ink = (0, 0, 0) if o.colour in ("yellow", "orange") else (255, 255, 255)
        cx, cy, r = _pixel_geometry(o, size)
        gx, gy, h = _digit_box(o, cx, cy, r)
        box = a[round(gy - h / 2):round(gy + h / 2), round(gx - 0.29 * h):round(gx + 0.29 * h)]
        assert np.all(box == ink, axis=-1).sum() > (size / 112) ** 2 * 15
        assert np.all(box == COLOURS[o.colour], axis=-1).sum() > 0
        assert np.all(box == ink, axis=-1).sum() + np.all(box == COLOURS[o.colour], axis=-1).sum() == box.shape[0] * box.shape[1]
