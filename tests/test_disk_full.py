"""A full disk, for real: checkpoints written to a small tmpfs (mounted here when the tests run as
root with CAP_SYS_ADMIN; skipped otherwise: tests/test_checkpoint_safety.py's patched writers cover
the same messages everywhere). A save that runs out of space fails with one line naming the room it
needed, leaves no temp folder (the disk is no fuller than before) and `latest` on a checkpoint that
loads; a save that would not fit beside the checkpoints --keep-checkpoints keeps prunes them down to
the newest first, with a log line; `pebr.train` on a full disk ends with one `error:` line."""
import errno
import logging
import os
import shutil
import subprocess

import pytest
import torch

from pebr import train
from pebr.errors import DiskFullError
from pebr.model.policy import build_tiny_policy, load_policy
from pebr.run.checkpoint import Checkpointer, load_trainer_state, verify
from pebr.run.rng import rng_state

MIB = 2**20


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_policy(seed=0)


def _free(path) -> int:
    return shutil.disk_usage(path).free


def _fill(disk, leave: int) -> None:
    """A ballast file that leaves about `leave` bytes free on `disk`."""
    size = _free(disk) - leave
    with open(disk / "ballast", "ab") as f:
        f.write(b"\0" * max(0, size))


def _tree(path) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def test_a_save_on_a_full_disk_fails_cleanly(small_disk, tiny):
    ck = Checkpointer(small_disk / "ck", keep=2)
    opt = torch.optim.AdamW(tiny.model.parameters(), lr=1e-3)
    ck.save(1, tiny, {"step": 1}, optimizer=opt, rng=rng_state())
    size = _tree(ck.path(1))
    _fill(small_disk, leave=size // 2)
    before = _free(small_disk)
    with pytest.raises(DiskFullError) as exc:
        ck.save(2, tiny, {"step": 2}, optimizer=opt, rng=rng_state())
    msg = str(exc.value)
    assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError)
    assert msg.startswith("no space left on device while writing checkpoint step 2") and "\n" not in msg
    assert f"needs about {size / MIB:.1f} MiB, the last checkpoint's size" in msg and "step_0000001" in msg
    assert not [n for n in os.listdir(ck.root) if n.startswith((".tmp", ".trash"))]
    assert _free(small_disk) >= before - 64 * 1024  # the partial checkpoint's space is back
    assert ck.latest() == ck.path(1) and verify(ck.path(1)) is None
    load_policy(ck.latest())
    os.remove(small_disk / "ballast")
    ck.save(2, tiny, {"step": 2}, optimizer=opt, rng=rng_state())  # room again: saves as usual
    assert ck.steps() == [1, 2]


def test_room_is_made_before_a_save(small_disk, tiny, caplog):
    ck = Checkpointer(small_disk / "ck", keep=3)
    for step in (1, 2):
        ck.save(step, tiny, {"step": step})
    size = _tree(ck.path(2))
    _fill(small_disk, leave=size * 3 // 2)
    with caplog.at_level(logging.INFO, logger="pebr"):
        ck.save(3, tiny, {"step": 3})  # fits beside the others: nothing pruned
        assert ck.steps() == [1, 2, 3] and "pruned below" not in caplog.text
        ck.save(4, tiny, {"step": 4})  # would not fit: steps 1 and 2 go first, 3 stays
    assert ck.steps() == [3, 4] and ck.latest() == ck.path(4)
    assert "pruned below --keep-checkpoints 3 to step_0000003 before saving" in caplog.text
    assert load_trainer_state(ck.latest())["step"] == 4


def test_the_command_on_a_full_disk_prints_one_line(small_disk):
    out = small_disk / "run"
    _fill(small_disk, leave=2 * MIB)
    with pytest.raises(SystemExit) as e:  # the first checkpoint alone does not fit
        train.main(["--stage", "0", "--output-dir", str(out), "--no-progress", "--sft-items", "4", "--sft-batch", "2",
                    "--max-steps", "1"])
    text = str(e.value.code)
    assert text.startswith("error: no space left on device while writing checkpoint step 1") and "\n" not in text
    ckpts = out / "stage0" / "checkpoints"
    assert not [n for n in os.listdir(ckpts) if n.startswith((".tmp", ".trash"))]
    assert not (out / "stage0" / ".pebr-run.lock").read_text()  # the lock released
