"""The recipe end to end on the tiny default, micro-sized: stage 0 -> sampling -> stage 1 -> stage 2,
then pebr.sample and pebr.eval; bad data rows are skipped and reported."""
import json
import os

import pytest

from pebr import config as C
from pebr import eval as pebr_eval
from pebr import sample as pebr_sample
from pebr import tasks, train
from pebr.checkpoint import Checkpointer
from pebr.metrics_log import read_metrics

GRPO_MICRO = ["-n", "2", "--rollout-batch", "2", "--micro-batch", "4", "--max-new-tokens", "12", "--sampling-items", "6",
              "--sampling-k", "2", "--no-progress", "--max-steps", "2", "--save-every", "1"]
REQUIRED_METRICS = ("step", "reward/overall", "accuracy", "kl", "clipfrac_high", "entropy", "response_length",
                    "tokens_per_s", "step_time_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """OUT with a micro stage 0 done (one SFT step on 8 procedural items)."""
    out = tmp_path_factory.mktemp("runs")
    train.main(["--stage", "0", "--output-dir", str(out), "--sft-items", "8", "--sft-epochs", "1", "--sft-batch", "8",
                "--no-progress"])
    return out


def test_stage0_writes_a_policy(out):
    latest = Checkpointer(out / "stage0" / "checkpoints").latest()
    assert latest and os.path.isfile(os.path.join(latest, "model.safetensors"))
    (m,) = read_metrics(str(out / "stage0" / "metrics.jsonl"))
    assert m["step"] == 1 and m["loss"] > 0


def test_stage1_then_stage2(out):
    train.main(["--stage", "1", "--output-dir", str(out), *GRPO_MICRO])
    splits = json.loads((out / "sampling" / "splits.json").read_text())
    assert sum(splits["counts"].values()) == 6 and splits["k"] == 2
    assert len((out / "sampling" / "rollouts.jsonl").read_text().splitlines()) == 12
    m1 = read_metrics(str(out / "stage1" / "metrics.jsonl"))
    assert [m["step"] for m in m1] == [1, 2]
    for key in REQUIRED_METRICS + ("reward/keyword", "reward/format", "reward/length"):
        assert key in m1[0], key
    s1 = Checkpointer(out / "stage1" / "checkpoints").latest()
    assert s1.endswith("step_0000002")
    train.main(["--stage", "2", "--output-dir", str(out), "--online-filter", *GRPO_MICRO])
    m2 = read_metrics(str(out / "stage2" / "metrics.jsonl"))
    assert [m["step"] for m in m2] == [1, 2] and "reward/accuracy" in m2[0]
    for m in m2:  # DAPO filter: groups with all-equal rewards are dropped; none left -> no update
        assert 0 <= m["groups_kept"] <= 2 and (m["groups_kept"] > 0 or m["skipped"] == 1)
    cfg2 = json.loads((out / "stage2" / "config.json").read_text())
    assert cfg2["stage"] == 2
    assert f"from {s1}" in (out / "stage2" / "train.log").read_text()  # stage 2 starts from stage 1's weights


def test_stage2_without_stage1_explains(tmp_path):
    with pytest.raises(SystemExit, match="stage-1"):
        train.main(["--stage", "2", "--output-dir", str(tmp_path), *GRPO_MICRO])


def test_sample_and_eval_clis(out, tmp_path, capsys):
    model = Checkpointer(out / "stage0" / "checkpoints").latest()
    pebr_sample.main(["--model", model, "--num-items", "4", "-k", "2", "--max-new-tokens", "8",
                      "--output-dir", str(tmp_path / "s")])
    splits = json.loads((tmp_path / "s" / "splits.json").read_text())
    assert sum(splits["counts"].values()) == 4
    assert "easy" in capsys.readouterr().out
    resp = tmp_path / "eval.jsonl"
    pebr_eval.main(["--model", model, "--num-items", "4", "--max-new-tokens", "8", "--output", str(resp)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1 and summary["by_type"]
    lines = [json.loads(x) for x in resp.read_text().splitlines()]
    assert len(lines) == 4 and {"response", "correct", "task_type"} <= set(lines[0])


def test_bad_rows_are_skipped_and_reported(out, tmp_path):
    from pebr.data import save_records

    path = str(tmp_path / "data.jsonl")
    save_records(tasks.generate_items(4, seed=11), path)
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"images": ["missing.png"], "problem": "Q?", "answer": "1"}) + "\n")
    model = Checkpointer(out / "stage0" / "checkpoints").latest()
    run = tmp_path / "run"
    train.main(["--stage", "1", "--model", model, "--data", path, "--output-dir", str(run), "--split", "all",
                *GRPO_MICRO[:-2], "--max-steps", "1"])
    text = (run / "stage1" / "train.log").read_text()
    assert "4 items loaded, 2 rows skipped" in text and "skipped row 4" in text and "skipped row 5" in text


def test_presets_and_cli_overrides():
    paper = C.preset("paper", 2)
    assert (paper.lr, paper.group_size, paper.temperature, paper.rollout_batch, paper.mini_batch) == (1e-6, 8, 1.2, 512, 128)
    assert C.preset("paper", 1).rollout_batch == 560 and C.preset("paper", 1).epochs == 1
    args = train.build_parser().parse_args(["--stage", "1", "--lr", "3e-4", "-n", "4", "--rollout-batch", "3",
                                            "--no-freeze-vision", "--sft-lr", "1e-3"])
    cfg = train.config_from_args(args)
    assert (cfg.lr, cfg.group_size, cfg.rollout_batch, cfg.mini_batch, cfg.freeze_vision, cfg.sft.lr) == (3e-4, 4, 3, 3, False, 1e-3)
    with pytest.raises(ValueError, match="mini_batch"):
        C.TrainConfig(rollout_batch=4, mini_batch=3)
    help_text = train.build_parser().format_help()
    for flag in ("--model", "--data", "--output-dir", "--max-steps", "--resume", "--preset", "--lr", "--group-size",
                 "--rollout-batch", "--temperature", "--top-p", "--max-new-tokens", "--kl-coef", "--seed"):
        assert flag in help_text


def test_non_finite_gradient_skips_the_update(tmp_path):
    """A NaN gradient (injected by a hook) skips the update, logged; the weights stay. A NaN reward scores 0."""
    import dataclasses
    import math

    import torch

    from pebr.grpo_trainer import GRPOTrainer
    from pebr.policy import build_tiny_policy

    policy = build_tiny_policy(seed=0)
    cfg = dataclasses.replace(C.preset("tiny", 1), group_size=2, rollout_batch=2, mini_batch=2, micro_batch=4,
                              max_new_tokens=6, kl_coef=0.0, max_steps=1, progress=False)
    logged = []
    trainer = GRPOTrainer(cfg, policy=policy, reference=None, items=tasks.generate_items(2, seed=3),
                          reward_fn=lambda text, item, k: {"overall": math.nan if item.id.endswith("0") else k / 10},
                          run_dir=str(tmp_path), init_model=None, log=logged.append)
    policy.model.lm_head.weight.register_hook(lambda g: g * math.nan)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    m = trainer.train_step()
    assert m["skipped"] == 1 and m["updates"] == 0 and any("skipped" in line for line in logged)
    assert m["reward_nonfinite"] == 2 and math.isfinite(m["reward/overall"])
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
