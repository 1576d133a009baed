"""pebr.eval: accuracy with its Wilson interval overall, per kind and per task type; greedy by
default; several checkpoints (or earlier summaries) in one table."""
import json
import random
import shutil

import pytest
import torch

from pebr import eval as pebr_eval
from pebr.model.policy import build_tiny_policy
from pebr.report.stats import wilson_interval
from pebr.data.tasks import TASK_TYPES, generate_items

FAST = ["--num-items", "6", "--max-new-tokens", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the tiny policy, its saved copy in two checkpoint folders)."""
    policy = build_tiny_policy(seed=0)
    root = tmp_path_factory.mktemp("eval_models")
    policy.save(root / "ckpt_a")
    shutil.copytree(root / "ckpt_a", root / "ckpt_b")
    return policy, str(root / "ckpt_a"), str(root / "ckpt_b")


def _check_groups_add_up(summary):
    for group in ("by_type", "by_kind"):
        rows = summary[group].values()
        assert sum(g["n"] for g in rows) == summary["n"], group
        assert sum(g["correct"] for g in rows) == summary["correct"], group
    for g in [summary, *summary["by_type"].values(), *summary["by_kind"].values()]:
        assert g["accuracy"] == pytest.approx(g["correct"] / g["n"])
        assert (g["lo"], g["hi"]) == pytest.approx(wilson_interval(g["correct"], g["n"]))


def test_summary_of_hand_made_records():
    rng = random.Random()
    records = [{"task_type": rng.choice(TASK_TYPES), "correct": rng.random() < 0.4, "format": rng.random()}
               for _ in range(rng.randint(20, 80))]
    s = pebr_eval.summarize(records)
    _check_groups_add_up(s)
    for t, g in s["by_type"].items():
        mine = [r["correct"] for r in records if r["task_type"] == t]
        assert (g["n"], g["correct"], g["kind"]) == (len(mine), sum(mine), t.split("/")[0])
    for k, g in s["by_kind"].items():
        assert g["n"] == sum(r["task_type"].startswith(k + "/") for r in records)
    # 3 of 10 correct: the interval written out (Wilson 1927), not read back from pebr.report.stats.
    s = pebr_eval.summarize([{"task_type": "reasoning/x", "kind": "reasoning", "correct": i < 3, "format": 1.0}
                             for i in range(10)])
    assert (s["correct"], s["n"], s["accuracy"]) == (3, 10, 0.3)
    assert (s["lo"], s["hi"]) == pytest.approx((0.1077913, 0.6032219), abs=1e-6)
    assert pebr_eval.summarize([])["n"] == 0  # nothing answered: no crash


def test_eval_writes_rows_per_task_type_that_add_up(tiny, tmp_path, capsys):
    _, a, _ = tiny
    assert pebr_eval.main(["--model", a, *FAST, "--output-dir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line stays the summary
    (summary_path,) = (tmp_path / "eval").glob("*.summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["model"] == a and summary["n"] == 6 and summary["decoding"]["greedy"] is True
    assert {k: summary[k] for k in printed} == printed
    assert set(summary["by_type"]) == {it.task_type for it in generate_items(6, seed=999)}
    assert set(summary["by_kind"]) == {"perception", "reasoning"}
    _check_groups_add_up(summary)
    records = [json.loads(x) for x in open(summary["responses"])]
    assert len(records) == 6 and all(r["kind"] == r["task_type"].split("/")[0] for r in records)
    table = (tmp_path / "eval" / summary_path.name.replace(".summary.json", ".md")).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(summary["by_type"]) + 2 + 1  # header, types, kinds, overall
    assert all(t in table for t in summary["by_type"]) and "**overall**" in table


def _table_rows(text):
    """The rows of the first Markdown table in `text` (the paired table follows it)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows


def test_paired_comparison_of_hand_made_records():
    """Gained/lost counted by item id (order and items missing from one side do not matter), per
    kind and overall, and the p-value the exact test gives for those counts."""
    def rec(i, kind, ok):
        return {"id": f"x{i}", "task_type": f"{kind}/t", "kind": kind, "correct": ok, "format": 1.0}

    before = [rec(i, "reasoning", i < 10) for i in range(30)] + [rec(100 + i, "perception", i % 2 == 0) for i in range(8)]
    after = [rec(i, "reasoning", 4 <= i < 20) for i in range(30)] + [rec(100 + i, "perception", i % 2 == 0) for i in range(8)]
    after = after[::-1] + [rec(999, "reasoning", True)]  # order shuffled, one item only in `after`
    rows = pebr_eval.paired_comparison([("A", before), ("B", after)])
    by = {r["group"]: r for r in rows}
    assert [r["group"] for r in rows] == ["perception", "reasoning", "overall"]
    assert (by["reasoning"]["gained"], by["reasoning"]["lost"], by["reasoning"]["n"]) == (10, 4, 30)
    assert (by["perception"]["gained"], by["perception"]["lost"], by["perception"]["p"]) == (0, 0, 1.0)
    assert (by["overall"]["gained"], by["overall"]["lost"], by["overall"]["n"]) == (10, 4, 38)
    assert by["reasoning"]["delta"] == pytest.approx(6 / 30)
    # 10 vs 4 of 14 discordant: 2 * sum_{x<=4} C(14, x) / 2^14 = 2 * 1471 / 16384
    assert by["reasoning"]["p"] == pytest.approx(2 * 1471 / 16384)
    text = pebr_eval.paired_table(rows)
    assert "| A -> B | reasoning | +0.200 | 10/30 | 4/30 | 0.18 |" in text
    # one kind only: its row, no "overall" row repeating it
    one = pebr_eval.paired_comparison([("A", before[:30]), ("B", after)])
    assert [r["group"] for r in one] == ["reasoning"] and (one[0]["gained"], one[0]["lost"]) == (10, 4)
    assert pebr_eval.paired_table([]) == ""


def test_two_checkpoints_make_one_table(tiny, tmp_path, capsys):
    _, a, b = tiny
    pebr_eval.main(["--model", a, "--model", b, *FAST, "--output-dir", str(tmp_path)])
    capsys.readouterr()
    rows = _table_rows((tmp_path / "eval" / "compare_mixed.md").read_text())
    assert rows[0][1:] == [pebr_eval._slug(a), pebr_eval._slug(b)]
    assert all(len(r) == 3 for r in rows) and rows[-1][0] == "**overall**"
    both = json.loads((tmp_path / "eval" / "compare_mixed.json").read_text())
    assert [m["model"] for m in both["models"]] == [a, b]
    assert len({m["items"]["ids_digest"] for m in both["models"]}) == 1  # the same items
    assert rows[-1][1].endswith("/6") and rows[-1][1] == rows[-1][2]  # same weights, greedy: same cells
    # same weights, greedy: nothing gained or lost, in the table and its JSON
    assert "McNemar" in (tmp_path / "eval" / "compare_mixed.md").read_text()
    assert both["paired"] and all(r["gained"] == r["lost"] == 0 and r["p"] == 1.0 for r in both["paired"])
    assert both["paired"][-1]["group"] == "overall" and both["paired"][-1]["n"] == 6

    # The same table from the written summaries, without re-running; bad files skipped and reported.
    summaries = sorted(str(p) for p in (tmp_path / "eval").glob("*.summary.json"))
    old_line = tmp_path / "old.json"  # the JSON line an older eval printed: accuracy and n only
    old_line.write_text(json.dumps({"accuracy": 0.5, "n": 4, "by_type": {"perception/colour": {"accuracy": 0.5, "n": 4}}}))
    (tmp_path / "bad.json").write_text("{not json")
    pebr_eval.main(["--compare", *summaries, str(old_line), str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "skipped --compare" in err and "1 of 4 --compare files skipped" in err
    again = _table_rows((tmp_path / "c" / "eval" / "compare_runs.md").read_text())
    assert [r[:3] for r in again if r[0] in dict((r[0], 1) for r in rows)] == rows
    old_overall = again[-1][3]
    assert old_overall.startswith("0.500 [0.150, 0.850] 2/4")

    with pytest.raises(SystemExit, match="--output names one responses file"):
        pebr_eval.main(["--model", a, "--model", b, "--output", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        pebr_eval.main([])


def test_greedy_by_default(tiny, tmp_path):
    policy, a, _ = tiny
    items = generate_items(4, seed=random.Random().randint(0, 10**6))

    def run(seed, **kw):
        torch.manual_seed(seed)
        return [r["response"] for r in pebr_eval.evaluate(policy, items, max_new_tokens=6, **kw)[1]]

    assert run(1) == run(2)  # default decoding does not read the RNG
    assert run(1, temperature=1.0) != run(2, temperature=1.0)  # control: sampling would be caught
    # Two CLI runs give identical results (responses and summaries).
    outs = []
    for k in range(2):
        pebr_eval.main(["--model", a, *FAST, "--output-dir", str(tmp_path / str(k))])
        (path,) = (tmp_path / str(k) / "eval").glob("*.summary.json")
        s = json.loads(path.read_text())
        outs.append(([json.loads(x)["response"] for x in open(s.pop("responses"))], s))
    assert outs[0] == outs[1]
