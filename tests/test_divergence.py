"""A diverged run stops: updates skipped for a non-finite gradient several times in a row end the
run with DivergedError (one `error:` line and a non-zero exit from pebr.train), and weights that
are not finite, or finite but blown up (the largest |w| grown past --max-weight-growth times the
last checkpoint's), are never saved over the last good checkpoint."""
import dataclasses
import os

import pytest
import torch

from pebr import train
from pebr.data.tasks import generate_items
from pebr.errors import DivergedError
from pebr.model.policy import build_tiny_policy
from pebr.recipe import config as C
from pebr.run.checkpoint import Checkpointer, load_trainer_state
from pebr.run.distributed import World
from pebr.trainers.base import weight_scale
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


def test_weight_scale_is_the_largest_finite_magnitude():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 5))
        model[0].weight[1, 2] = -7.5  # the largest magnitude is negative
    want = max(float(p.detach().abs().max()) for p in model.parameters())
    assert weight_scale(model) == (want, []) and want == 7.5
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
        model[0].bias[0] = float("-inf")
    assert weight_scale(model) == (7.5, ["0.bias", "1.weight"])  # finite ones measured, the others named


def test_exploded_finite_weights_are_never_saved(tmp_path):
    trainer, _ = _trainer(tmp_path)
    start = trainer.max_abs_weight
    assert start == weight_scale(trainer.policy.model)[0] > 0
    trainer.train_step()
    good = trainer.save()
    assert load_trainer_state(good)["max_abs_weight"] == trainer.max_abs_weight  # the next save's reference
    param = next(trainer.policy.model.parameters())
    with torch.no_grad():
        param.view(-1)[0] = 11 * trainer.max_abs_weight  # finite, 11 times the last checkpoint's largest
    trainer.train_step()
    with pytest.raises(DivergedError, match=r"the weights blew up: the largest \|w\| is .* more than --max-weight-growth 10"):
        trainer.save()
    ckpts = Checkpointer(str(tmp_path / "stage0" / "checkpoints"))
    assert ckpts.latest() == good and not any(n.startswith(".tmp") for n in os.listdir(ckpts.root))
    assert trainer.max_abs_weight == load_trainer_state(good)["max_abs_weight"]  # still the good one's
    with torch.no_grad():
        param.view(-1)[0] = 9 * trainer.max_abs_weight  # within the bound: saved, and the new reference
    trainer.save()
    assert trainer.max_abs_weight == weight_scale(trainer.policy.model)[0]
    off, _ = _trainer(tmp_path / "off", max_weight_growth=0)  # 0: never refused
    with torch.no_grad():
        next(off.policy.model.parameters()).view(-1)[0] = 1e6
    off.save()


def test_a_resumed_trainer_starts_from_its_checkpoints_scale(tmp_path):
    trainer, _ = _trainer(tmp_path)
    with torch.no_grad():
        next(trainer.policy.model.parameters()).view(-1)[0] = 5.0
    path = trainer.save()
    from pebr.model.policy import load_policy

    cfg = trainer.cfg
    resumed = SFTTrainer(cfg, policy=load_policy(path), items=generate_items(8, seed=3), run_dir=str(tmp_path / "stage0"),
                         world=World(), log=lambda *a: None)
    assert resumed.max_abs_weight == 5.0 == load_trainer_state(path)["max_abs_weight"]


def test_a_run_that_blows_up_saves_nothing(tmp_path):
    """--sft-lr 1e3: the first update takes the largest |w| of the tiny policy from 1 to 100, finite;
    the step's checkpoint is refused and the command ends with one line (before: it was saved, and
    replaced good checkpoints under --keep-checkpoints)."""
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "0", "--output-dir", str(tmp_path), "--no-progress", "--sft-items", "8", "--sft-batch", "4",
                    "--sft-lr", "1e3", "--max-steps", "3", "--save-every", "1"])
    msg = str(e.value.code)
    assert msg.startswith("error: step 1: the weights blew up") and len(msg.splitlines()) == 1, msg
    assert Checkpointer(str(tmp_path / "stage0" / "checkpoints")).steps() == []
