"""The difficulty knob of the built-in world (pebr.data.scenes.Difficulty, --difficulty): each level
keeps its scenes inside its ranges and palette, answers stay exact, the standard level is the
world every earlier figure was measured on (the same items, bit for bit), and bad levels raise."""
import hashlib
import random
import re

import pytest

from pebr.recipe.config import DIFFICULTY_LEVELS, preset
from pebr.data.scenes import COLOURS, DIFFICULTIES, Difficulty, Scene, random_scene
from pebr.data.tasks import REASONING_TASKS, TASK_TYPES, generate_items

from tests.test_scenes_tasks import _solve


def _digest(items) -> str:
    h = hashlib.sha1()
    for it in items:
        h.update((it.id + it.problem + it.answer + it.reference_response + ",".join(it.key_words)).encode())
        h.update(it.image.tobytes())
    return h.hexdigest()


def test_standard_is_the_world_before_the_knob():
    # Digest of generate_items(120, seed=7) at commit 54cdf0f, before Difficulty existed: the
    # default level must not move the items (or every earlier measurement stops applying).
    items = generate_items(120, seed=7)
    assert _digest(items) == _digest(generate_items(120, seed=7, difficulty="standard"))
    assert _digest(items) == _digest(generate_items(120, seed=7, difficulty=Difficulty()))
    assert _digest(items) == "e7e50198084e5cda5b7bc78791bfe1e3fc53e028"
    assert all(re.fullmatch(r"s7-\d{6}", it.id) for it in items)


@pytest.mark.parametrize("level", sorted(DIFFICULTIES))
def test_scenes_stay_in_the_levels_ranges(level):
    d = DIFFICULTIES[level]
    palette = set(d.palette())
    for item in generate_items(240, seed=5, difficulty=level):
        scene = Scene.from_dict(item.scene)
        things = scene.bars if scene.kind == "bars" else scene.objects
        lo, hi = d.objects(scene.kind)
        least = 3 if item.task_type in ("reasoning/colour_most", "reasoning/count_remove") else \
            2 if item.task_type in REASONING_TASKS else 1
        assert max(lo, least) <= len(things) <= max(hi, least), (level, item.task_type, len(things))
        assert {t.colour for t in things} <= palette
        assert item.answer == _solve(item.task_type, item.problem, scene), item
        if level != "standard":
            assert item.id.startswith(f"{level}-s5-")


def test_simple_is_simpler_than_standard():
    def mean_objects(level):
        items = generate_items(240, seed=3, difficulty=level)
        scenes = [Scene.from_dict(i.scene) for i in items]
        return sum(len(s.objects or s.bars) for s in scenes) / len(items)
    assert mean_objects("simple") < mean_objects("standard") - 1
    assert {it.task_type for it in generate_items(len(TASK_TYPES), seed=0, difficulty="simple")} == set(TASK_TYPES)


def test_levels_and_config_agree_and_bad_levels_raise():
    assert DIFFICULTY_LEVELS == tuple(DIFFICULTIES)
    assert preset("tiny", 1).difficulty in DIFFICULTIES
    with pytest.raises(ValueError, match="difficulty"):
        generate_items(2, seed=0, difficulty="hard-ish")
    with pytest.raises(ValueError, match="difficulty"):
        preset("tiny", 1).__class__(difficulty="nope")
    with pytest.raises(ValueError, match="shapes"):
        Difficulty(shapes=(3, 2))
    with pytest.raises(ValueError, match="shapes"):
        Difficulty(shapes=(1, 10))
    with pytest.raises(ValueError, match="colours"):
        Difficulty(colours=2)
    with pytest.raises(ValueError, match="bars"):
        Difficulty(bars=(2, 5), colours=4)  # one colour per bar: 5 bars need 5 colours
    with pytest.raises(ValueError, match="n_objects"):
        random_scene(random.Random(0), kind="bars", n_objects=5, difficulty=Difficulty(bars=(2, 3), colours=4))
    assert len(COLOURS) == Difficulty().colours


def test_every_entry_point_takes_the_level():
    import dataclasses

    from pebr import eval as pebr_eval
    from pebr import experiment, sample
    from pebr.recipe import items as stages

    cfg = dataclasses.replace(preset("tiny", 1), difficulty="simple")
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, num_items=4),
                              sampling=dataclasses.replace(cfg.sampling, num_items=4))
    for purpose in ("sft", "rl"):
        assert all(it.id.startswith("simple-") for it in stages.load_items(cfg, purpose=purpose))
    assert sample.build_parser().parse_args(["--difficulty", "simple"]).difficulty == "simple"
    assert sample.build_parser().parse_args([]).difficulty is None  # then: the level the model was trained at
    assert pebr_eval.build_parser().parse_args(["--model", "x", "--difficulty", "simple"]).difficulty == "simple"
    with pytest.raises(SystemExit):
        sample.build_parser().parse_args(["--difficulty", "nope"])
    cc = experiment.CurriculumConfig(eval_items=6)
    items, info = experiment.held_out_items(cc, cfg, [])
    assert info["difficulty"] == "simple" and all(it.id.startswith("simple-s999-") for it in items)


def test_trained_difficulty_read_from_the_checkpoint(tmp_path):
    import json

    from pebr.recipe.paths import trained_difficulty

    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    assert trained_difficulty(str(ckpt)) == "standard"  # an HF folder: no trainer state
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {"difficulty": "simple"}}))
    assert trained_difficulty(str(ckpt)) == "simple"
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {"stage": 0}}))  # before the knob
    assert trained_difficulty(str(ckpt)) == "standard"
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {"difficulty": "no-such-level"}}))
    assert trained_difficulty(str(ckpt)) == "standard"
    (ckpt / "trainer_state.json").write_text("{not json")
    assert trained_difficulty(str(ckpt)) == "standard"
