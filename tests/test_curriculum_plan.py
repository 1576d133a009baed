"""pebr.recipe.curriculum_plan: the power statement and wall-time estimate the ablation prints before
it starts: at the defaults (worked by hand), from the arms a resumed OUT already holds (discordance
counted by hand from hand-written eval records), and `--plan`, which stops before any work."""
import io
import json
import math
import os
import random
from contextlib import redirect_stdout

import pytest

from pebr import experiment
from pebr.recipe import curriculum_plan as P
from pebr.recipe.curriculum import ARMS, CurriculumConfig, Overrides, stage_config
from pebr.report.power import detectable_difference
from pebr.report.stats import wilson_interval

NO_OVERRIDES = Overrides({}, {}, {})


def _plan(tmp_path, **kw):
    cc = CurriculumConfig(output_dir=str(tmp_path / "out"), device="cpu", **kw)
    return P.plan(cc, stage_config(cc, NO_OVERRIDES, stage=1, seed=0, output_dir=cc.output_dir))


def test_defaults_detect_three_points_on_reasoning(tmp_path):
    p = _plan(tmp_path)
    r = p["kinds"]["reasoning"]
    # 2,100 mixed items alternate perception, reasoning: 1,050 reasoning items a seed, 5 seeds
    assert (r["items_per_seed"], r["seeds"], r["pairs"]) == (1050, 5, 5250)
    assert r["discordance"] == 0.53 and "pilot" in r["discordance_source"]
    # by hand (tests/test_power.py): 5,250 pairs at discordance 0.53 detect 0.028143
    assert r["detectable"] == pytest.approx(0.028143, abs=2e-6) and r["detectable"] < P.TARGET
    assert r["power_at_target"] > 0.80 and r["pairs_for_target"] == 4620
    assert p["kinds"]["perception"]["discordance"] == 0.79


def test_wall_time_of_the_defaults_by_hand(tmp_path):
    t = P.TIMING[("tiny", "cpu")]
    w = _plan(tmp_path)["wall"]
    # 5 seeds x (300 + 150 + 150 + 300) steps; 1 + 3 x 5 evals of 2,100 items; the warm-up and the sampling
    assert w["work"] == {"warmup": True, "sampling": True, "grpo_steps": 4500, "evals": 16, "eval_items": 33600}
    assert w["seconds"] == pytest.approx(t.warmup_s + t.sampling_s + 4500 * t.grpo_step_s + 33600 * t.eval_item_s)
    assert _plan(tmp_path, warmup="/somewhere")["wall"]["work"]["warmup"] is False


def _records(outcomes: dict[str, tuple[bool, str]]) -> str:
    return "".join(json.dumps({"id": i, "correct": c, "kind": k, "task_type": f"{k}/x"}) + "\n"
                   for i, (c, k) in outcomes.items())


def test_a_resumed_out_measures_its_own_discordance_and_skips_finished_work(tmp_path):
    out = tmp_path / "out"
    rng = random.Random()
    ids = {f"q{k}": ("perception" if k % 2 == 0 else "reasoning") for k in range(40)}
    right = {arm.key: [{i: rng.random() < 0.4 for i in ids} for _ in range(2)] for arm in ARMS}
    for arm in ARMS:
        for seed in range(2):
            folder = out / arm.folder / f"seed{seed}" / "eval"
            folder.mkdir(parents=True)
            (folder / "heldout.jsonl").write_text(_records({i: (right[arm.key][seed][i], k) for i, k in ids.items()}))
            (folder / "heldout.summary.json").write_text("{}")
    (out / "a_stage2" / "seed0" / "stage2").mkdir()
    (out / "a_stage2" / "seed0" / "stage2" / "stage.json").write_text(json.dumps({"steps": 300}))
    (out / "c_union" / "seed1" / "union").mkdir()
    (out / "c_union" / "seed1" / "union" / "stage.json").write_text(json.dumps({"steps": 60}))  # another length
    p = _plan(tmp_path, seeds=3)
    for kind in ("perception", "reasoning"):
        rates = {}
        for other in "ac":  # by hand: items b and the other grade differently, over the two seeds
            rates[other] = sum(right["b"][s][i] != right[other][s][i] for s in range(2) for i, k in ids.items() if k == kind)
        k = p["kinds"][kind]
        # the larger count's upper 95% Wilson bound (both comparisons have 40 pairs)
        assert k["discordance"] == pytest.approx(wilson_interval(max(rates.values()), 40)[1])
        assert f"{max(rates.values())} of 40 pairs" in k["discordance_source"]
        assert k["detectable"] == pytest.approx(detectable_difference(k["pairs"], k["discordance"]))
    work = p["wall"]["work"]
    assert work["grpo_steps"] == 3 * 900 - 300  # only a's seed-0 stage is finished at this length
    assert work["evals"] == 1 + 3 * 3 - 6  # the warm-up's and seed 2's evals are left
    forced = _plan(tmp_path, seeds=3, pilot_discordance=0.25)["kinds"]["reasoning"]
    assert forced["discordance"] == 0.25 and forced["discordance_source"] == "--pilot-discordance"


def test_plan_flag_prints_the_statement_and_stops(tmp_path):
    out = tmp_path / "never"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert experiment.main(["curriculum", "--plan", "--device", "cpu", "--output-dir", str(out)]) == 0
    text = buf.getvalue()
    assert not out.exists()  # nothing trained, nothing written
    assert "power statement" in text and "reasoning: 1,050 held-out items x 5 seeds = 5,250 pairs" in text
    assert "smallest difference detected 0.028 (2.8 points)" in text and "4,500 GRPO steps" in text
    hours = _plan(tmp_path)["wall"]["seconds"] / 3600
    assert f"about {hours:.1f} h" in text
    with pytest.raises(SystemExit, match="pilot_discordance"):
        experiment.main(["curriculum", "--plan", "--pilot-discordance", "1.5", "--output-dir", str(out)])


def test_unreadable_records_are_not_a_pilot(tmp_path):
    folder = tmp_path / "out" / "b_stage1_stage2" / "seed0" / "eval"
    folder.mkdir(parents=True)
    (folder / "heldout.jsonl").write_text("not json\n")
    other = tmp_path / "out" / "a_stage2" / "seed0" / "eval"
    other.mkdir(parents=True)
    (other / "heldout.jsonl").write_text(_records({"x": (True, "reasoning")}))
    p = _plan(tmp_path)
    assert "pilot" in p["kinds"]["reasoning"]["discordance_source"]
    assert math.isfinite(p["kinds"]["reasoning"]["detectable"])
    assert os.path.isdir(folder)
