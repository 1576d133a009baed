"""The recipe end to end on the tiny default, micro-sized: stage 0 -> sampling -> stage 1 -> stage 2,
then pebr.sample and pebr.eval; bad data rows are skipped and reported."""
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from pebr.recipe import config as C
from pebr import eval as pebr_eval
from pebr import sample as pebr_sample
from pebr import train
from pebr.data import tasks
from pebr.run.checkpoint import Checkpointer
from pebr.run.metrics_log import read_metrics

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
    # the log names the machine its step times come from (pebr.run.machine)
    assert re.search(r"machine: .+ threads, ATen capability \w+, engine CPU kernels", (out / "stage0" / "train.log").read_text())


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
    splits = json.loads((tmp_path / "s" / "sampling" / "splits.json").read_text())  # OUT/sampling, as pebr.train
    assert sum(splits["counts"].values()) == 4
    assert "easy" in capsys.readouterr().out
    resp = tmp_path / "eval.jsonl"
    pebr_eval.main(["--model", model, "--num-items", "4", "--max-new-tokens", "8", "--output", str(resp)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1 and summary["by_type"]
    lines = [json.loads(x) for x in resp.read_text().splitlines()]
    assert len(lines) == 4 and {"response", "correct", "task_type"} <= set(lines[0])


def test_bad_rows_are_skipped_and_reported(out, tmp_path):
    from pebr.data.records import save_records

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

    from pebr.trainers.grpo import GRPOTrainer
    from pebr.model.policy import build_tiny_policy

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


# ---- usability: what a first run does, where --model points, where sample and eval write


def test_first_stage1_uses_the_sft_flags_and_says_what_runs_first(tmp_path):
    """No stage-0 policy: stage 1 runs the warm-up with the given --sft-* flags (not the preset's 192
    steps) and logs the plan first; --log-every writes one line per step; the summary counts right."""
    run = tmp_path / "run"
    train.main(["--stage", "1", "--output-dir", str(run), "--sft-items", "8", "--sft-epochs", "1", "--sft-batch", "8",
                "--sft-lr", "1e-3", "--log-every", "1", *GRPO_MICRO])
    (m0,) = read_metrics(str(run / "stage0" / "metrics.jsonl"))  # one SFT step: 8 items, 1 epoch, batch 8
    assert m0["step"] == 1
    s0 = Checkpointer(run / "stage0" / "checkpoints").latest()
    assert json.loads((Path(s0) / "trainer_state.json").read_text())["config"]["sft"]["lr"] == 1e-3
    log1 = (run / "stage1" / "train.log").read_text()
    plan = log1.index("running first the warm-up SFT (stage 0): 1 steps (8 items x 1 epochs / batch 8")
    assert "then dataset-level sampling: 6 items x k=2" in log1[plan:]
    assert "--max-steps 2 counts stage-1 steps only" in log1
    log0 = (run / "stage0" / "train.log").read_text()
    assert "stage 0 (warm-up SFT): 1 steps" in log0 and "step 1/1 loss " in log0  # --log-every reaches the warm-up
    assert "step 1/2 reward " in log1 and "step 2/2 reward " in log1 and " kl " in log1 and "s/step" in log1
    assert "stage 1 GRPO: first step " in log1 and "for the 1 steps left" in log1  # how long, said early
    assert re.search(r"step 1/2 reward .* eta \d+s", log1) and not re.search(r"step 2/2 .* eta", log1)
    assert "first 1 " in log1 and "last 1 " in log1 and "first 10" not in log1  # 2 steps: no claim of 10


def test_model_accepts_stage_and_checkpoints_folders(out, tmp_path, capsys):
    from pebr.run.model_path import resolve_model_path

    latest = Checkpointer(out / "stage0" / "checkpoints").latest()
    for given in (out / "stage0", out / "stage0" / "checkpoints", out / "stage0" / "checkpoints" / "latest", latest):
        assert resolve_model_path(given) == latest, given
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "junk").mkdir()
    for bad, message in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "empty", "holds no checkpoint"),
                         (tmp_path / "junk", "not a model folder")):
        with pytest.raises(ValueError, match=message):
            resolve_model_path(bad)
        for main, base in ((pebr_eval.main, []), (pebr_sample.main, []), (train.main, ["--stage", "1"])):
            with pytest.raises(SystemExit, match="^" + re.escape(f"error: --model {bad}: ")):
                main([*base, "--model", str(bad)])
    # eval: a stage folder, responses under --output-dir OUT/eval/
    pebr_eval.main(["--model", str(out / "stage0"), "--num-items", "2", "--max-new-tokens", "4",
                    "--output-dir", str(tmp_path / "o")])
    (resp,) = (tmp_path / "o" / "eval").glob("*.jsonl")
    assert "step_" in resp.name and len(resp.read_text().splitlines()) == 2
    assert f"model {latest}" in capsys.readouterr().out


def _sampling_cfg(run, **over):
    cfg = train.config_from_args(train.parse_args(["--stage", "1", "--output-dir", str(run), *GRPO_MICRO]))
    return dataclasses.replace(cfg, **over)


def test_dataset_level_sampling_is_reproducible(out, tmp_path):
    """The same records, model and seed give the same rollouts and splits, whatever the RNG held before."""
    import torch

    from pebr.recipe.items import load_items
    from pebr.recipe.splits import ensure_sampling

    model = Checkpointer(out / "stage0" / "checkpoints").latest()
    texts = []
    for name, noise in (("a", 1), ("b", 2)):
        torch.manual_seed(noise)
        cfg = _sampling_cfg(tmp_path / name)
        ensure_sampling(cfg, model, load_items(cfg, purpose="rl"))
        texts.append((tmp_path / name / "sampling" / "rollouts.jsonl").read_text())
    assert texts[0] == texts[1] and len(texts[0].splitlines()) == 12
    a, b = (json.loads((tmp_path / n / "sampling" / "splits.json").read_text()) for n in "ab")
    assert {s: a[s] for s in ("easy", "medium", "hard")} == {s: b[s] for s in ("easy", "medium", "hard")}
    cfg = _sampling_cfg(tmp_path / "c", seed=7)  # another run seed: another draw
    ensure_sampling(cfg, model, load_items(cfg, purpose="rl"))
    assert (tmp_path / "c" / "sampling" / "rollouts.jsonl").read_text() != texts[0]


def test_sample_writes_the_cache_train_reuses_only_when_settings_match(out, tmp_path):
    """pebr.sample --output-dir OUT: reads OUT/stage0, writes OUT/sampling; pebr.train reuses it only at
    the same temperature, top_p and max_new_tokens."""
    from pebr.recipe.items import load_items
    from pebr.recipe.splits import ensure_sampling

    run = tmp_path / "run"
    run.mkdir()
    os.symlink(out / "stage0", run / "stage0")
    cfg = _sampling_cfg(run)
    items = load_items(cfg, purpose="rl")
    model = Checkpointer(run / "stage0" / "checkpoints").latest()
    flags = ["--output-dir", str(run), "--num-items", "6", "-k", "2", "--seed", str(cfg.sampling.seed),
             "--max-new-tokens", str(cfg.max_new_tokens), "--top-p", str(cfg.sampling.top_p)]
    splits_json = run / "sampling" / "splits.json"
    pebr_sample.main([*flags, "--temperature", "1.2"])  # no --model: OUT/stage0's latest
    meta = json.loads(splits_json.read_text())["meta"]
    assert meta["model"] == os.path.abspath(model) and meta["temperature"] == 1.2
    ensure_sampling(cfg, model, items)  # the run samples at its own T (not 1.2): sampled again
    assert cfg.sampling.temperature != 1.2
    assert json.loads(splits_json.read_text())["meta"]["temperature"] == cfg.sampling.temperature
    pebr_sample.main([*flags, "--temperature", str(cfg.sampling.temperature)])
    before = (run / "sampling" / "rollouts.jsonl").read_text()
    got = ensure_sampling(cfg, model, items)  # same settings: reused as is
    assert got["meta"]["seed"] == cfg.sampling.seed and (run / "sampling" / "rollouts.jsonl").read_text() == before


def test_sample_with_the_preset_draws_what_training_drew(out, tmp_path):
    """`pebr.sample --preset tiny` (pool seed, run seed, temperature, top-p, budget from the preset) writes
    the rollouts a default stage-1 run's sampling writes, token for token (a fresh-clone walkthrough
    found the paper-default pebr.sample splitting 80/48 where training had 88/40)."""
    from pebr.recipe.items import load_items
    from pebr.recipe.splits import ensure_sampling

    cfg = _sampling_cfg(tmp_path / "train", max_new_tokens=C.preset("tiny", 1).max_new_tokens)
    model = Checkpointer(out / "stage0" / "checkpoints").latest()
    ensure_sampling(cfg, model, load_items(cfg, purpose="rl"))
    pebr_sample.main(["--preset", "tiny", "--model", str(model), "--output-dir", str(tmp_path / "cli"),
                      "--num-items", str(cfg.sampling.num_items), "-k", str(cfg.sampling.k)])
    trained = (tmp_path / "train" / "sampling" / "rollouts.jsonl").read_text()
    assert (tmp_path / "cli" / "sampling" / "rollouts.jsonl").read_text() == trained and trained


def test_sampling_cache_reused_through_a_symlinked_stage0(out, tmp_path):
    """A run folder whose stage0 links another run's: the same checkpoint, so the cached sampling
    is reused, not drawn again (the cache compares real paths)."""
    import shutil

    from pebr.recipe.items import load_items
    from pebr.recipe.splits import ensure_sampling

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    os.symlink(out / "stage0", first / "stage0")
    cfg = _sampling_cfg(first)
    items = load_items(cfg, purpose="rl")
    ensure_sampling(cfg, Checkpointer(first / "stage0" / "checkpoints").latest(), items)
    shutil.copytree(first / "sampling", second / "sampling")
    os.symlink(first / "stage0", second / "stage0")  # a link to a link
    cached = (second / "sampling" / "rollouts.jsonl").stat().st_mtime_ns
    cfg2 = dataclasses.replace(cfg, output_dir=str(second))
    ensure_sampling(cfg2, Checkpointer(second / "stage0" / "checkpoints").latest(), items)
    assert (second / "sampling" / "rollouts.jsonl").stat().st_mtime_ns == cached  # reused, not rewritten
