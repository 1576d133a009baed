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


def test_allow_changed_settings_runs_and_records_the_new_values(tmp_path):
    """--allow-changed-settings: each difference is logged, the new values are what runs (the LR
    the scheduler restored and the weight decay the optimizer restored are replaced) and what the
    checkpoints record, with the change itself; a later resume compares against the new values."""
    import torch

    from pebr.model.policy import load_policy
    from pebr.run.checkpoint import Checkpointer, load_trainer_state
    from pebr.trainers.optim import build_optimizer, set_vision_trainable

    out = tmp_path / "run"
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "2"])
    new = ["--sft-lr", "0.001", "--weight-decay", "0.05"]
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "4", "--resume", "--allow-changed-settings", *new])
    log_text = (out / "stage0" / "train.log").read_text()
    for line in ("--sft-lr 0.001 (the run being resumed has 0.002)", "--weight-decay 0.05 (the run being resumed has 0.01)"):
        assert f"--resume --allow-changed-settings: {line}: going on with the new value" in log_text
    metrics = [json.loads(line) for line in (out / "stage0" / "metrics.jsonl").read_text().splitlines()]
    warm = [min(1.0, (k + 1) / 10) for k in range(1, 5)]  # the tiny warm-up's 10-step LR ramp, after step k
    assert [m["lr"] for m in metrics] == pytest.approx([0.002 * warm[0], 0.002 * warm[1], 0.001 * warm[2], 0.001 * warm[3]])
    ck = Checkpointer(out / "stage0" / "checkpoints")
    state = load_trainer_state(ck.latest())
    assert state["step"] == 4 and state["config"]["sft"]["lr"] == 0.001
    assert state["config"]["optimizer"]["weight_decay"] == 0.05
    assert state["settings_changed"] == [{"step": 2, "changed": [
        {"flag": "--weight-decay", "from": 0.01, "to": 0.05}, {"flag": "--sft-lr", "from": 0.002, "to": 0.001}]}]
    policy = load_policy(ck.latest())
    set_vision_trainable(policy.model, not state["config"]["sft"]["freeze_vision"])  # the parameters it trained
    opt, _ = build_optimizer(policy.model, lr=0.5, weight_decay=0.5)
    ck.load_optimizer(ck.latest(), policy.model, opt, state)  # what the step-4 optimizer ran with
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["lr"] == pytest.approx(0.001 * warm[3])
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())
    # the recorded values are the run's now: the same flags resume without the override, the old ones do not
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "5", "--resume", *new])
    assert load_trainer_state(ck.latest())["settings_changed"] == state["settings_changed"]  # carried along
    with pytest.raises(SystemExit, match=r"--sft-lr 0.002 \(the run being resumed has 0.001\).*--allow-changed-settings"):
        train.main([*ARGS, "--output-dir", str(out), "--max-steps", "6", "--resume", "--sft-lr", "0.002"])


def test_allow_changed_settings_cannot_change_the_weights_shapes(run):
    with pytest.raises(SystemExit) as e:
        train.main([*ARGS, "--output-dir", str(run), "--max-steps", "3", "--resume", "--allow-changed-settings",
                    "--text-layers", "3", "--seed", "5"])
    msg = str(e.value.code)
    assert msg.startswith("error: --resume from ") and len(msg.splitlines()) == 1
    assert "--text-layers 3 (the run being resumed has 2)" in msg and "cannot change them" in msg
    assert "--seed" not in msg  # only the shapes are named: the rest could change


def test_allow_changed_settings_records_another_starting_model(run, tmp_path):
    from pebr.model.policy import build_tiny_policy
    from pebr.run.checkpoint import Checkpointer, load_trainer_state

    out = tmp_path / "run"
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "1"])
    other = tmp_path / "other"
    build_tiny_policy(seed=1).save(str(other))
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "2", "--resume", "--allow-changed-settings",
                "--model", str(other)])
    state = load_trainer_state(Checkpointer(out / "stage0" / "checkpoints").latest())
    assert state["config"]["model"] == str(other)
    assert state["settings_changed"] == [{"step": 1, "changed": [{"flag": "--model", "from": None, "to": str(other)}]}]
