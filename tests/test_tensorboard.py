"""MetricsLog's optional TensorBoard scalars, with a fake SummaryWriter (tensorboard is not a
requirement), and the --tensorboard flag."""
import math
import random
import sys

import pytest
import torch

from pebr.recipe import config as C
from pebr import train
from pebr.run import metrics_log
from pebr.run.metrics_log import MetricsLog, check_tensorboard, read_metrics


class FakeWriter:
    """Records what torch.utils.tensorboard.SummaryWriter would have written."""

    made: list["FakeWriter"] = []

    def __init__(self, log_dir=None, purge_step=None, **kw):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars, self.flushes, self.closed = [], 0, False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        assert not self.closed
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


@pytest.fixture
def fake_writer(monkeypatch):
    FakeWriter.made = []
    monkeypatch.setattr(metrics_log, "summary_writer_class", lambda: FakeWriter)
    return FakeWriter.made


def test_numeric_metrics_become_scalars(tmp_path, fake_writer):
    rng = random.Random()
    steps = sorted(rng.sample(range(1, 1000), rng.randint(2, 6)))
    values = {s: rng.random() for s in steps}
    path = tmp_path / "stage1" / "metrics.jsonl"
    with MetricsLog(str(path), tensorboard=True) as log:
        for s in steps:
            log.log(s, {"reward/overall": torch.tensor(values[s]), "updates": 2, "kl": float("nan"),
                        "skip_reason": "all groups filtered", "skipped": True, "extra": [1.0]})
        (w,) = fake_writer
        assert w.log_dir == str(tmp_path / "stage1" / "tensorboard") and w.purge_step == 1
        assert w.flushes == len(steps) and not w.closed  # each step is visible at once
    assert w.closed
    expected = [x for s in steps for x in (("reward/overall", pytest.approx(values[s]), s), ("updates", 2.0, s))]
    assert w.scalars == expected  # NaN, strings, bools and lists are not scalars
    assert [r["step"] for r in read_metrics(str(path))] == steps  # the JSONL file is unchanged


def test_resume_purges_the_steps_written_again(tmp_path, fake_writer):
    path = str(tmp_path / "metrics.jsonl")
    last = random.randint(5, 30)
    with MetricsLog(path) as log:  # no TensorBoard: no writer
        for s in range(1, last + 1):
            log.log(s, {"a": float(s)})
    assert fake_writer == []
    ckpt = random.randint(1, last - 1)
    log = MetricsLog(path, tensorboard=True)
    assert fake_writer[0].purge_step == last + 1  # reopened: steps after the file's last
    log.truncate_after(ckpt)  # resumed from an earlier checkpoint
    assert fake_writer[0].closed and fake_writer[1].purge_step == ckpt + 1
    log.log(ckpt + 1, {"a": 0.5})
    log.close()
    assert fake_writer[1].scalars == [("a", 0.5, ckpt + 1)] and fake_writer[1].closed


def test_missing_tensorboard_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ValueError, match="tensorboard package") as exc:
        check_tensorboard()
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="tensorboard package"):
        MetricsLog(str(tmp_path / "metrics.jsonl"), tensorboard=True)
    MetricsLog(str(tmp_path / "metrics.jsonl")).close()  # without the flag nothing is needed


def test_tensorboard_flag():
    assert C.TrainConfig().tensorboard is False and C.preset("tiny", 0).tensorboard is False
    options = {o for a in train.build_parser()._actions for o in a.option_strings}
    assert {"--tensorboard", "--no-tensorboard"} <= options
    on = train.config_from_args(train.parse_args(["--stage", "0", "--tensorboard"]))
    assert on.tensorboard is True and math.isclose(on.sft.lr, C.preset("tiny", 0).sft.lr)
