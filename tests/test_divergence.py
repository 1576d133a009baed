"""A diverged run stops: updates skipped for a non-finite gradient several times in a row end the
run with DivergedError (one `error:` line and a non-zero exit from pebr.train), and weights that
are not finite are never saved over the last good checkpoint."""
import dataclasses
import os

import pytest
import torch

from pebr import train
from pebr.data.tasks import generate_items
from pebr.errors import DivergedError
from pebr.model.policy import build_tiny_policy
from pebr.recipe import config as C
from pebr.run.checkpoint import Checkpointer
from pebr.run.distributed import World
from pebr.trainers.sft import SFTTrainer


def _trainer(tmp_path, **over):
    cfg = dataclasses.replace(C.preset("tiny", 0), progress=False, save_every=1, max_steps=8, **over)
    cfg = cfg.with_overrides(sft={"batch_size": 4, "num_items": 8})
    logged = []
    trainer = SFTTrainer(cfg, policy=build_tiny_policy(seed=0), items=generate_items(8, seed=3),
                         run_dir=str(tmp_path / "stage0"), world=World(), log=logged.append)
    return trainer, logged


def _poison_gradients(trainer, after_step: int):
    """From optimizer step `after_step` on, one parameter's gradient is NaN (what a diverging loss gives)."""
    param = next(p for p in trainer.policy.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("nan") if trainer.step >= after_step else g)


def test_skipped_updates_in_a_row_stop_the_run(tmp_path):
    trainer, logged = _trainer(tmp_path, max_skipped_updates=3)
    _poison_gradients(trainer, after_step=2)
    with pytest.raises(DivergedError, match="3 updates in a row had a non-finite gradient"):
        trainer.train()
    assert trainer.step == 4  # steps 3 and 4 skipped, the third skip (step 5) stopped the run
    assert sum("update skipped" in m for m in logged) == 3
    ckpts = Checkpointer(str(tmp_path / "stage0" / "checkpoints"))
    assert ckpts.latest().endswith("step_0000004")  # the good steps were saved; nothing after
    for p in trainer.policy.model.parameters():  # the skipped updates left the weights finite
        assert torch.isfinite(p).all()


def test_one_skipped_update_is_not_divergence(tmp_path):
    trainer, logged = _trainer(tmp_path, max_skipped_updates=2)
    param = next(p for p in trainer.policy.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("nan") if trainer.step in (1, 3, 5) else g)  # never two in a row
    trainer.train()
    assert trainer.step == 8 and sum("update skipped" in m for m in logged) == 3
    trainer, _ = _trainer(tmp_path / "off", max_skipped_updates=0)  # 0: never stop
    _poison_gradients(trainer, after_step=0)
    trainer.train()
    assert trainer.step == 8


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer, _ = _trainer(tmp_path)
    trainer.train_step()
    good = trainer.save()
    with torch.no_grad():
        next(trainer.policy.model.parameters()).view(-1)[0] = float("inf")
    trainer.train_step()
    with pytest.raises(DivergedError, match="non-finite values"):
        trainer.save()
    ckpts = Checkpointer(str(tmp_path / "stage0" / "checkpoints"))
    assert ckpts.latest() == good and not any(n.startswith(".tmp") for n in os.listdir(ckpts.root))


def test_the_command_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "0", "--output-dir", str(tmp_path), "--no-progress", "--sft-items", "8", "--sft-batch", "4",
                    "--sft-lr", "1e30", "--max-steps", "12", "--max-skipped-updates", "1"])
    assert str(e.value.code).startswith("error: step ") and "non-finite" in str(e.value.code)
    assert len(str(e.value.code).splitlines()) == 1
