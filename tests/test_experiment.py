"""pebr.experiment curriculum: the ablation end to end at a toy size (warm-up, shared sampling, three
arms x two seeds, held-out eval, table, chart, JSON), its resume, and the aggregation over seeds."""
import contextlib
import io
import json
import math
import os
import random

import pytest

from pebr import experiment
from pebr.recipe import curriculum
from pebr.report import curriculum_report
from pebr.run.checkpoint import Checkpointer, load_trainer_state
from pebr.run.metrics_log import read_metrics

TOY = ["--seeds", "2", "--steps", "2", "--eval-items", "8", "--sft-items", "16", "--sft-epochs", "1",
       "--sft-batch", "16", "--sampling-items", "8", "--sampling-k", "2", "-n", "2", "--rollout-batch", "2",
       "--micro-batch", "4", "--max-new-tokens", "12", "--no-progress", "--device", "cpu"]
STAGES = {"a": ["stage2"], "b": ["stage1", "stage2"], "c": ["union"]}


PRINTED = {}  # what the first run printed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert experiment.main(["curriculum", *TOY, "--output-dir", str(out)]) == 0
    PRINTED["first"] = buf.getvalue()
    return out, json.loads((out / "curriculum.json").read_text())


def _final(out, arm, seed, stage):
    return Checkpointer(out / arm / f"seed{seed}" / stage / "checkpoints").latest()


def test_every_arm_trains_its_stages_from_the_right_start(run):
    out, res = run
    warmup = res["warmup"]["path"]
    assert Checkpointer(out / "warmup" / "stage0" / "checkpoints").latest() == warmup
    for arm in experiment.ARMS:
        for seed in (0, 1):
            steps = arm.steps(2)
            assert sum(steps) == 2  # the same number of GRPO steps in every arm
            start = warmup
            for name, n in zip(STAGES[arm.key], steps):
                final = _final(out, arm.folder, seed, name)
                assert final is not None and os.path.isfile(os.path.join(final, "model.safetensors")), (arm.key, name)
                state = load_trainer_state(final)
                assert state["step"] == n and state["config"]["seed"] == seed
                # b's stage 2 starts from b's stage-1 result, every other stage from the warm-up
                assert os.path.realpath(state["init_model"]) == os.path.realpath(start), (arm.key, name)
                start = final
            assert res["arms"][arm.key]["per_seed"][seed]["final"] == start
    b0 = load_trainer_state(_final(out, "b_stage1_stage2", 0, "stage2"))
    assert b0["init_model"] == _final(out, "b_stage1_stage2", 0, "stage1") != warmup


def test_union_arm_scores_both_rewards(run):
    out, _ = run
    for m in read_metrics(str(out / "c_union" / "seed0" / "union" / "metrics.jsonl")):
        for key in ("reward/accuracy", "reward/keyword", "reward/scene", "reward/format", "reward/perception",
                    "reward/reasoning"):
            assert key in m, key
        # means are linear: the step's mean overall is the mean of the two stages' means
        assert m["reward/overall"] == pytest.approx(0.5 * (m["reward/perception"] + m["reward/reasoning"]), abs=1e-6)
    a = read_metrics(str(out / "a_stage2" / "seed0" / "stage2" / "metrics.jsonl"))[0]
    assert "reward/accuracy" in a and "reward/keyword" not in a  # arm a: the reasoning reward alone


def test_union_reward_of_hand_made_parts():
    p = {"overall": random.random(), "keyword": 0.25, "scene": 0.5, "format": 1.0, "length": 1.0}
    r = {"overall": random.random(), "accuracy": 1.0, "format": 1.0}
    u = experiment.union_reward(p, r)
    assert u["overall"] == pytest.approx((p["overall"] + r["overall"]) / 2)
    assert (u["perception"], u["reasoning"], u["keyword"], u["accuracy"]) == (p["overall"], r["overall"], 0.25, 1.0)


def _rows(md):
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in md.split("## Result")[0].splitlines() if line.startswith("| "))}


def test_table_chart_and_json_agree(run):
    out, res = run
    md = (out / "curriculum.md").read_text()
    rows = _rows(md)
    assert {"a", "b", "c", "warm-up"} <= set(rows) and len([k for k in rows if k in "abc"]) == 3
    for key in "abc":
        arm = res["arms"][key]
        for col, kind in ((2, "perception"), (3, "reasoning")):
            agg = arm[kind]
            values = [s["eval"][kind]["accuracy"] for s in arm["per_seed"]]
            assert agg["values"] == values and agg["n"] == 2
            assert agg["mean"] == pytest.approx(sum(values) / 2)
            assert rows[key][col] == f"{agg['mean']:.3f} [{agg['lo']:.3f}, {agg['hi']:.3f}]"
            for s in arm["per_seed"]:  # each eval's own count and Wilson interval, as pebr.eval writes it
                summary = json.loads(open(s["eval"]["summary"]).read())
                assert s["eval"][kind] == pytest.approx(summary["by_kind"][kind])
    assert res["command"] in md and "training wall time" in md
    held = res["held_out"]
    assert held["seed"] == 999 and held["n"] + held["dropped_equal_to_training_items"] == 8
    records = [json.loads(x) for x in open(out / "a_stage2" / "seed0" / "eval" / "heldout.jsonl")]
    assert len(records) == held["n"] and all(r["id"].startswith("simple-s999-") for r in records)  # the preset's level
    png = (out / "curriculum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "curriculum.png") as im:
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100


def test_table_and_chart_of_hand_made_numbers(run, tmp_path):
    """The toy policies score 0 everywhere; random accuracies catch a swapped column or arm."""
    from pebr.report.eval_tables import proportion

    _, res = run
    res = json.loads(json.dumps(res))
    for key, arm in res["arms"].items():
        for s in arm["per_seed"]:
            s["eval"] = {k: proportion(random.randint(0, 50), 50) for k in experiment.KINDS}
        arm.update(curriculum._plain(experiment.aggregate([s["eval"] for s in arm["per_seed"]])))
    rows = _rows(experiment.markdown(res))
    for key, arm in res["arms"].items():
        for col, kind in ((2, "perception"), (3, "reasoning")):
            a = arm[kind]
            assert rows[key][col] == f"{a['mean']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]", (key, kind)
    per_seed = [line for line in experiment.markdown(res).split("## Per seed")[1].splitlines() if line.startswith("| b | 1 ")]
    p = res["arms"]["b"]["per_seed"][1]["eval"]["perception"]
    assert per_seed and f"{p['accuracy']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}] {p['correct']}/50" in per_seed[0]
    experiment.plot(res, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_arms(run):
    out, first = run
    finals = {(a.folder, s, n): _final(out, a.folder, s, n) for a in experiment.ARMS for s in (0, 1)
              for n in STAGES[a.key]}
    mtimes = {k: os.path.getmtime(v) for k, v in finals.items()}
    metrics = (out / "c_union" / "seed1" / "union" / "metrics.jsonl").read_text()
    assert experiment.main(["curriculum", *TOY, "--output-dir", str(out)]) == 0
    res = json.loads((out / "curriculum.json").read_text())
    for key, arm in res["arms"].items():
        for s in arm["per_seed"]:
            assert not any(st["trained_now"] for st in s["stages"]) and s["eval"]["reused"], key
            assert all(st["wall_s"] is not None for st in s["stages"])  # the earlier run's time, kept
        assert arm["perception"] == first["arms"][key]["perception"]
    assert {k: os.path.getmtime(v) for k, v in finals.items()} == mtimes
    assert (out / "c_union" / "seed1" / "union" / "metrics.jsonl").read_text() == metrics
    assert res["warmup"]["reused"] and "earlier run (skipped)" in (out / "curriculum.md").read_text()
    # a killed experiment: one arm/seed folder missing -> only that one is trained (and evaluated) again
    import shutil

    shutil.rmtree(out / "c_union" / "seed1")
    # and one eval's records cut short (a full disk, a kill mid-write): evaluated again, not trained again
    records = out / "a_stage2" / "seed0" / "eval" / "heldout.jsonl"
    records.write_text(records.read_text().splitlines()[0][:20] + "\n")
    assert experiment.main(["curriculum", *TOY, "--output-dir", str(out)]) == 0
    res = json.loads((out / "curriculum.json").read_text())
    trained = {(k, s["seed"]) for k, arm in res["arms"].items() for s in arm["per_seed"]
               if any(st["trained_now"] for st in s["stages"])}
    evaluated = {(k, s["seed"]) for k, arm in res["arms"].items() for s in arm["per_seed"] if not s["eval"]["reused"]}
    assert trained == {("c", 1)} and evaluated == {("c", 1), ("a", 0)} and _final(out, "c_union", 1, "union") is not None
    assert len(records.read_text().splitlines()) == res["held_out"]["n"]


def test_aggregate_over_seeds_of_hand_made_numbers():
    # t quantiles written out (tables): t_{0.975, 2} = 4.302653, t_{0.975, 1} = 12.706205
    xs = [random.random() for _ in range(3)]
    per_seed = [{"perception": {"accuracy": x}, "reasoning": {"accuracy": 1 - x}} for x in xs]
    agg = experiment.aggregate(per_seed)
    mean = sum(xs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    p = agg["perception"]
    assert (p["mean"], p["sd"], p["lo"], p["hi"], p["n"]) == pytest.approx((mean, sd, mean - half, mean + half, 3), abs=1e-6)
    assert agg["reasoning"]["mean"] == pytest.approx(1 - mean) and agg["reasoning"]["sd"] == pytest.approx(sd)
    two = experiment.aggregate(per_seed[:2])["perception"]
    assert two["hi"] - two["mean"] == pytest.approx(12.706205 * abs(xs[0] - xs[1]) / 2, abs=1e-5)
    one = curriculum._plain(experiment.aggregate(per_seed[:1]))["perception"]
    assert one["mean"] == xs[0] and one["lo"] is None and one["hi"] is None  # one seed: no interval, JSON-safe
    cell = curriculum_report._mean_cell(one)
    assert cell == f"{xs[0]:.3f} [-]"


def test_arm_steps_add_up():
    for n in range(2, 40):
        a, b, c = (arm.steps(n) for arm in experiment.ARMS)
        assert a == [n] and c == [n] and sum(b) == n and b[1] - b[0] in (0, 1)


def test_bad_settings_stop_before_any_work(tmp_path):
    for flags, said in ((["--eval-seed", "1"], "sampled pool"), (["--eval-seed", "2"], "SFT pool"),
                        (["--steps", "1"], "steps must be >= 2")):
        with pytest.raises(SystemExit, match=said):
            experiment.main(["curriculum", *flags, "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_power_statement_printed_first_and_kept(run):
    out, res = run
    printed = PRINTED["first"]
    assert printed.startswith("power statement") and printed.index("power statement") < printed.index("table:")
    assert "\n".join(res["plan"]["lines"]) in printed
    latest = json.loads((out / "curriculum.json").read_text())  # a later test reran it: a statement of its own
    assert "\n".join(latest["plan"]["lines"]) in (out / "curriculum.md").read_text()
    r = res["plan"]["kinds"]["reasoning"]
    assert (r["items_per_seed"], r["seeds"], r["pairs"]) == (4, 2, 8)  # --eval-items 8, --seeds 2


def _heldout(out, folder, seed):
    return {r["id"]: r for r in map(json.loads, open(out / folder / f"seed{seed}" / "eval" / "heldout.jsonl"))}


def test_paired_results_match_the_eval_records(run):
    """The toy arms' held-out records counted by hand, pair by pair, against the JSON and the table."""
    out, res = run
    folders = {a.key: a.folder for a in experiment.ARMS}
    md = (out / "curriculum.md").read_text()
    for comp in ("b-a", "b-c"):
        other = comp[-1]
        for kind in experiment.KINDS:
            got = res["paired"][comp]["kinds"][kind]
            n = g = l = 0
            for seed in (0, 1):
                b, o = _heldout(out, folders["b"], seed), _heldout(out, folders[other], seed)
                ids = [i for i, r in b.items() if r["kind"] == kind]
                sg = sum(b[i]["correct"] and not o[i]["correct"] for i in ids)
                sl = sum(o[i]["correct"] and not b[i]["correct"] for i in ids)
                assert (got["per_seed"][seed]["gained"], got["per_seed"][seed]["lost"]) == (sg, sl)
                n, g, l = n + len(ids), g + sg, l + sl
            assert (got["n"], got["gained"], got["lost"], got["seeds"]) == (n, g, l, 2)
            assert f"| **{comp}** | **{kind}** | **pooled** |" in md


def test_paired_report_of_hand_made_outcomes(run, tmp_path):
    """Random per-item outcomes (the toy policies score 0 everywhere): the pooled rows of the table
    carry the counts and difference counted by hand, per kind and per task type, and the chart draws."""
    _, res = run
    res = json.loads(json.dumps(res))
    rng = random.Random()
    types = {"perception": ["perception/colour", "perception/count"], "reasoning": ["reasoning/sum", "reasoning/compare"]}
    items = {f"it{k}": (kind, rng.choice(types[kind])) for k, kind in enumerate(["perception", "reasoning"] * 30)}
    outcomes = {a: [{i: {"correct": rng.random() < acc, "kind": k, "task_type": t} for i, (k, t) in items.items()}
                    for _ in range(3)] for a, acc in (("a", 0.3), ("b", 0.5), ("c", 0.4))}
    res["paired"] = curriculum._plain(curriculum_report.paired_results(outcomes, resamples=500))
    md = experiment.markdown(res)
    for comp, other in (("b-a", "a"), ("b-c", "c")):
        for kind in experiment.KINDS:
            g = sum(outcomes["b"][s][i]["correct"] and not outcomes[other][s][i]["correct"]
                    for s in range(3) for i, (k, _) in items.items() if k == kind)
            l = sum(outcomes[other][s][i]["correct"] and not outcomes["b"][s][i]["correct"]
                    for s in range(3) for i, (k, _) in items.items() if k == kind)
            r = res["paired"][comp]["kinds"][kind]
            assert (r["gained"], r["lost"], r["n"]) == (g, l, 90)
            assert r["diff"] == pytest.approx((g - l) / 90)
            row = f"| **{comp}** | **{kind}** | **pooled** | **{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]** | {g} | {l} | 90 |"
            assert row in md, row
        for t in (t for ts in types.values() for t in ts):
            ids = [i for i, (_, tt) in items.items() if tt == t]
            g = sum(outcomes["b"][s][i]["correct"] and not outcomes[other][s][i]["correct"] for s in range(3) for i in ids)
            assert res["paired"][comp]["types"][t]["gained"] == g and res["paired"][comp]["types"][t]["n"] == 3 * len(ids)
    assert "## Per task type" in md.replace("### Per task type", "## Per task type")
    experiment.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
