"""Usability of the command lines without running a stage: --device checked up front with one
line, the per-step log line, the end-of-stage summary."""
import types

import pytest
import torch

from pebr import eval as pebr_eval
from pebr import sample as pebr_sample
from pebr import train
from pebr.run.cli import check_device
from pebr.recipe.runner import grpo_summary
from pebr.trainers.base import Trainer

MAINS = [(train.main, ["--stage", "1"]), (pebr_sample.main, []), (pebr_eval.main, ["--model", "m"])]


@pytest.mark.parametrize("main, base", MAINS, ids=["train", "sample", "eval"])
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", "mps"])
def test_a_device_that_is_no_device_fails_in_one_line(main, base, device):
    with pytest.raises(SystemExit) as e:
        main([*base, "--device", device])
    msg = str(e.value.code)
    assert msg == f"error: --device {device!r} is not a device: use cpu, cuda or cuda:N"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("main, base", MAINS, ids=["train", "sample", "eval"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_fails_in_one_line(main, base, device):
    with pytest.raises(SystemExit) as e:
        main([*base, "--device", device])
    msg = str(e.value.code)
    assert msg.startswith(f"error: --device {device}: CUDA is not available here (") and msg.endswith("use --device cpu")
    assert "\n" not in msg


def test_check_device_accepts_the_three_forms():
    assert check_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_step_line_is_compact_and_names_what_is_there():
    fake = types.SimpleNamespace(total_steps=150)
    grpo = {"step": 10, "reward/overall": 0.51234, "accuracy": 0.125, "loss": -0.0123, "kl": 0.0021, "step_time_s": 2.345,
            "skipped": 0}
    assert Trainer.step_line(fake, grpo) == "step 10/150 reward 0.5123 acc 0.125 loss -0.0123 kl 0.0021 2.35s/step"
    sft = {"step": 3, "loss": 1.5, "step_time_s": 0.5, "skipped": 1}
    assert Trainer.step_line(fake, sft) == "step 3/150 loss 1.5 update skipped 0.50s/step"
    fake.step = 10
    assert Trainer.step_line(fake, grpo, 341.0).endswith("2.35s/step eta 5m41s")
    fake.step = 150  # the last step: nothing left to estimate
    assert Trainer.step_line(fake, grpo, 0.0).endswith("2.35s/step")


def test_format_duration():
    from pebr.trainers.base import format_duration

    assert [format_duration(x) for x in (0, 7.3, 59.6, 125, 3599, 3725, -4)] == \
        ["0s", "7s", "1m00s", "2m05s", "59m59s", "1h02m", "0s"]


def test_summary_never_claims_more_steps_than_ran():
    hist = lambda n: [{"reward/overall": float(i), "accuracy": i / 100} for i in range(n)]  # noqa: E731
    assert grpo_summary(hist(1)) == "reward/overall 0.000, accuracy 0.000 (1 step)"
    assert grpo_summary(hist(3)).startswith("reward/overall first 1 0.000 -> last 1 2.000;")
    assert grpo_summary(hist(7)).startswith("reward/overall first 3 1.000 -> last 3 5.000;")
    s = grpo_summary(hist(50))
    assert s.startswith("reward/overall first 10 4.500 -> last 10 44.500;") and s.endswith("accuracy last 10 0.445")
