"""--resume continues the run it finds, not another: a flag that changes what the run computes
(learning rate, group size, loss, data, preset, the starting model...) and differs from the
checkpoint's is an error naming it; flags that only change how long it runs or how it reports go."""
import json

import pytest

from pebr import train
from pebr.recipe import config as C
from pebr.recipe.config import resume_conflicts

ARGS = ["--stage", "0", "--no-progress", "--sft-items", "8", "--sft-batch", "4", "--save-every", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "2"])
    return out


@pytest.mark.parametrize("flags, named", [
    (["--sft-lr", "1e6"], "--sft-lr 1000000.0 (the run being resumed has 0.002)"),
    (["--weight-decay", "0.5"], "--weight-decay 0.5 (the run being resumed has 0.01)"),
    (["--seed", "7"], "--seed 7 (the run being resumed has 0)"),
    (["--sft-items", "16"], "--sft-num-items 16 (the run being resumed has 8)"),
    (["--difficulty", "standard"], "--difficulty standard (the run being resumed has simple)"),
])
def test_a_changed_setting_is_refused_naming_the_flag(run, flags, named):
    before = (run / "stage0" / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        train.main([*ARGS, "--output-dir", str(run), "--max-steps", "3", "--resume", *flags])
    msg = str(e.value.code)
    assert msg.startswith("error: --resume from ") and named in msg and len(msg.splitlines()) == 1
    assert (run / "stage0" / "metrics.jsonl").read_text() == before  # nothing ran


def test_a_changed_starting_model_is_refused(run, tmp_path):
    from pebr.model.policy import build_tiny_policy

    other = tmp_path / "other"
    build_tiny_policy(seed=1).save(str(other))
    with pytest.raises(SystemExit, match=r"--model .*other \(the run being resumed started from a policy built at random init\)"):
        train.main([*ARGS, "--output-dir", str(run), "--max-steps", "3", "--resume", "--model", str(other)])


def test_how_long_and_how_it_reports_may_change(tmp_path):
    out = tmp_path / "run"
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "2"])
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "3", "--resume", "--log-every", "1",
                "--keep-checkpoints", "5", "--save-every", "2"])
    steps = [json.loads(line)["step"] for line in (out / "stage0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_conflicts_compare_sections_and_skip_what_an_older_checkpoint_lacks():
    cfg = C.preset("tiny", 2)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert resume_conflicts(cfg, saved) == []
    saved["group_size"], saved["optimizer"]["betas"] = 4, [0.9, 0.95]
    del saved["model_size"]  # a field this checkpoint's version did not have: not compared
    got = resume_conflicts(cfg, saved)
    assert got == ["--group-size 8 (the run being resumed has 4)", "--betas 0.9 0.999 (the run being resumed has 0.9 0.95)"]
