"""The recipe layer's seams: typed errors, the logging context, `--model OUT`, `--split all`, the
rollout-engine factory and its per-step hook, the optimizer section every stage shares."""
import dataclasses
import json
import logging
import os
import random

import pytest
import torch

from pebr import train
from pebr.data.tasks import generate_items
from pebr.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MissingPolicyError,
    PebrError,
    RunLockError,
)
from pebr.model.policy import build_tiny_policy
from pebr.recipe import config as C
from pebr.recipe.items import read_items
from pebr.rollout.factory import ROLLOUT_ENGINES, build_rollout_engine
from pebr.rollout.hf_engine import HFRollout
from pebr.run.checkpoint import STATE_FILE
from pebr.run.cli import errors_as_exit
from pebr.run.distributed import World
from pebr.run.log_setup import LOGGER, stage_log
from pebr.run.model_path import resolve_model_path
from pebr.trainers.grpo import GRPOTrainer
from pebr.trainers.sft import SFTTrainer

TINY_GRPO = ["-n", "2", "--rollout-batch", "2", "--micro-batch", "4", "--max-new-tokens", "8", "--no-progress",
             "--max-steps", "1", "--save-every", "1"]


# ---- errors are types; only main() makes them a line and an exit status


def test_library_errors_are_exceptions_not_exits():
    for cls in (ConfigError, DataError, MissingPolicyError, CheckpointError, RunLockError):
        assert issubclass(cls, PebrError) and issubclass(cls, Exception) and not issubclass(cls, SystemExit)
    for cls in (ConfigError, DataError, CheckpointError):  # `except ValueError` of older callers still catches them
        assert issubclass(cls, ValueError)


def test_errors_as_exit_makes_one_line_and_leaves_bugs_alone():
    with pytest.raises(SystemExit) as e:
        with errors_as_exit():
            raise DataError("no usable rows in x.jsonl")
    assert e.value.code == "error: no usable rows in x.jsonl"
    with pytest.raises(SystemExit) as e:
        with errors_as_exit():
            raise RunLockError("held elsewhere", quiet=True)  # rank 0 said it already
    assert e.value.code == 1
    with pytest.raises(ValueError):  # outside a settings block a plain ValueError is a bug: traceback
        with errors_as_exit():
            raise ValueError("bug")
    with pytest.raises(SystemExit, match="^error: bad value$"):
        with errors_as_exit(settings=True):
            raise ValueError("bad value")


def test_bad_data_file_is_a_data_error(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text("this is not json\n")
    with pytest.raises(DataError):
        read_items(str(bad), num_items=4, seed=0, log=lambda m: None)
    with pytest.raises(DataError, match="no data file"):
        read_items(str(tmp_path / "missing.jsonl"), num_items=4, seed=0, log=lambda m: None)
    with pytest.raises(SystemExit, match="^error: "):  # the command: one line
        train.main(["--stage", "2", "--output-dir", str(tmp_path / "o"), "--data", str(bad), "--model",
                    str(_tiny_folder(tmp_path)), *TINY_GRPO])


def test_missing_previous_stage_is_typed(tmp_path):
    from pebr.recipe.runner import resolve_init_model

    cfg = dataclasses.replace(C.preset("tiny", 2), output_dir=str(tmp_path))
    with pytest.raises(MissingPolicyError, match="stage-1"):
        resolve_init_model(cfg, World())


# ---- logging: set for a block, restored after


def test_stage_log_nests_and_restores(tmp_path):
    log = logging.getLogger(LOGGER)
    marker = logging.NullHandler()
    log.addHandler(marker)
    before = (log.level, list(log.handlers), log.propagate)
    tag = random.randrange(10**9)
    try:
        with stage_log(str(tmp_path / "stage1")):
            log.info(f"outer {tag}")
            with stage_log(str(tmp_path / "stage0")):
                log.info(f"inner {tag}")
            log.info(f"outer again {tag}")
        assert (log.level, list(log.handlers), log.propagate) == before
        outer = (tmp_path / "stage1" / "train.log").read_text()
        inner = (tmp_path / "stage0" / "train.log").read_text()
        assert f"outer {tag}" in outer and f"outer again {tag}" in outer and f"inner {tag}" not in outer
        assert f"inner {tag}" in inner and "outer" not in inner
        with pytest.raises(RuntimeError):  # restored when the block fails too
            with stage_log(str(tmp_path / "stage2")):
                raise RuntimeError("boom")
        assert (log.level, list(log.handlers), log.propagate) == before
    finally:
        log.removeHandler(marker)


# ---- --model OUT: the run's latest stage


def _complete(folder):
    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", STATE_FILE):
        with open(os.path.join(folder, name), "w") as f:
            f.write('{"step": 1}')


def test_model_flag_takes_a_run_folder(tmp_path):
    run = tmp_path / "runs"
    _complete(run / "stage0" / "checkpoints" / "step_0000576")
    assert resolve_model_path(str(run)) == str(run / "stage0" / "checkpoints" / "step_0000576")
    _complete(run / "stage1" / "checkpoints" / "step_0000100")
    _complete(run / "stage1" / "checkpoints" / "step_0000150")
    assert resolve_model_path(str(run)) == str(run / "stage1" / "checkpoints" / "step_0000150")
    os.makedirs(run / "stage2" / "checkpoints")  # stage 2 started, nothing saved yet: stage 1's is the latest
    assert resolve_model_path(str(run)) == str(run / "stage1" / "checkpoints" / "step_0000150")
    _complete(run / "stage10" / "checkpoints" / "step_0000001")  # stages compare as numbers, not strings
    assert resolve_model_path(str(run)) == str(run / "stage10" / "checkpoints" / "step_0000001")
    empty = tmp_path / "empty_run"
    os.makedirs(empty / "stage1" / "checkpoints")
    with pytest.raises(CheckpointError, match="no stage of this run folder"):
        resolve_model_path(str(empty))
    os.makedirs(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="run folder"):
        resolve_model_path(str(tmp_path / "nothing"))


# ---- --split all: no dataset-level sampling


def _tiny_folder(tmp_path):
    path = tmp_path / "tiny"
    if not path.exists():
        build_tiny_policy(seed=0).save(str(path))
    return path


def test_split_all_trains_without_sampling(tmp_path):
    out = tmp_path / "out"
    train.main(["--stage", "2", "--output-dir", str(out), "--model", str(_tiny_folder(tmp_path)), "--split", "all",
                "--sampling-items", "4", *TINY_GRPO])
    assert not (out / "sampling").exists(), "--split all must not sample"
    log = (out / "stage2" / "train.log").read_text()
    assert "no dataset-level sampling" in log and "(split 'all')" in log
    assert (out / "stage2" / "checkpoints" / "latest").exists()
    # without it the same command samples first
    train.main(["--stage", "2", "--output-dir", str(tmp_path / "out2"), "--model", str(_tiny_folder(tmp_path)),
                "--sampling-items", "4", "--sampling-k", "2", "--min-split-items", "2", *TINY_GRPO])
    assert (tmp_path / "out2" / "sampling" / "splits.json").exists()


# ---- the rollout engine: one factory, one hook per optimizer step


def test_factory_builds_the_named_engine_and_refuses_others():
    policy = build_tiny_policy(seed=0)
    assert ROLLOUT_ENGINES == tuple(C.TrainConfig.__dataclass_fields__["rollout_engine"].metadata["choices"])
    engine = build_rollout_engine("hf", policy, shared_prefix=False)
    assert isinstance(engine, HFRollout) and engine.shared_prefix is False
    with pytest.raises(ConfigError, match="rollout engine must be one of"):
        build_rollout_engine("vllm-not-here", policy)
    with pytest.raises(ValueError, match="rollout_engine"):
        dataclasses.replace(C.preset("tiny", 1), rollout_engine="nope")


class _CountingEngine(HFRollout):
    """The transformers engine, counting the weight updates it is told of and what it generated."""

    def __init__(self, policy):
        super().__init__(policy)
        self.updates, self.generations, self.saw = 0, 0, []

    def generate(self, prompt, params):
        self.generations += 1
        return super().generate(prompt, params)

    def update_weights(self, model):
        self.updates += 1
        self.saw.append(float(next(p for p in model.parameters() if p.requires_grad).detach().sum()))


def test_trainer_hands_the_engine_every_update(tmp_path):
    cfg = dataclasses.replace(C.preset("tiny", 2), group_size=2, rollout_batch=4, mini_batch=2, micro_batch=4,
                              max_new_tokens=6, kl_coef=0.0, lr=1e-3, progress=False, warmup_steps=0, max_steps=2,
                              save_every=100)
    policy = build_tiny_policy(seed=0)
    engine = _CountingEngine(policy)
    reward = lambda text, item, k: {"overall": random.random()}  # noqa: E731  (every group has a signal)
    trainer = GRPOTrainer(cfg, policy=policy, reference=None, items=generate_items(8, seed=random.randrange(10**6)),
                          reward_fn=reward, run_dir=str(tmp_path / "s"), init_model=None, world=World(),
                          rollout_engine=engine, log=lambda m: None)
    hist = trainer.train()
    updates = sum(m["updates"] for m in hist)
    assert updates == 4 and engine.updates == updates  # 2 steps x 2 mini-batches, each an optimizer step
    assert engine.generations == 2 and trainer.rollout_engine is engine
    assert len(set(engine.saw)) == len(engine.saw), "each call must see the weights after that step"


def test_grpo_trainer_builds_its_engine_from_the_config(tmp_path):
    cfg = dataclasses.replace(C.preset("tiny", 2), group_size=2, rollout_batch=2, mini_batch=2, progress=False,
                              shared_prefix=False)
    trainer = GRPOTrainer(cfg, policy=build_tiny_policy(seed=0), reference=None, items=generate_items(2, seed=1),
                          reward_fn=None, run_dir=str(tmp_path / "s"), init_model=None, world=World())
    assert isinstance(trainer.rollout_engine, HFRollout) and trainer.rollout_engine.shared_prefix is False


# ---- the optimizer section: every stage's AdamW and clip


def test_optimizer_flags_reach_the_warmup_and_grpo(tmp_path):
    args = ["--weight-decay", "0.25", "--betas", "0.8", "0.9", "--grad-clip", "0.5"]
    for stage in (0, 1):
        cfg = train.config_from_args(train.parse_args(["--stage", str(stage), *args]))
        assert cfg.optimizer == C.OptimizerConfig(weight_decay=0.25, betas=(0.8, 0.9), grad_clip=0.5)
    from pebr.recipe.runner import warmup_config

    assert warmup_config(cfg).optimizer == cfg.optimizer  # stage 1's own warm-up takes them too
    cfg = dataclasses.replace(C.preset("tiny", 0), optimizer=C.OptimizerConfig(weight_decay=0.25, betas=(0.8, 0.9)),
                              progress=False)
    sft = SFTTrainer(cfg, policy=build_tiny_policy(seed=0), items=generate_items(4, seed=2), run_dir=str(tmp_path / "w"),
                     world=World())
    group = sft.opt.param_groups[0]
    assert group["weight_decay"] == 0.25 and tuple(group["betas"]) == (0.8, 0.9)
    with pytest.raises(ValueError, match="grad_clip"):
        C.OptimizerConfig(grad_clip=0.0)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["optimizer"] == {"weight_decay": 0.25, "betas": [0.8, 0.9], "grad_clip": 1.0}
    torch.testing.assert_close(torch.tensor(0.0), torch.tensor(0.0))
