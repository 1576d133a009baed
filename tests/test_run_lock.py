"""One run per folder (pebr.run.lock): a second process is refused with the first's pid, host,
start time and command; a lock left by a SIGKILLed run is taken over; without flock the pid
check does the same; under torchrun only rank 0 locks and the others follow its answer; and
`python -m pebr.train` twice on one --output-dir: the second stops at once, the first's files
stay, and after SIGKILL a --resume takes the stale lock over."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from pebr.run import lock as run_lock
from pebr.run.lock import LOCK_FILE, RunLock, RunLockError, hold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
# Holds the lock of argv[1] until its stdin closes (or it is killed); says "held" once it has it.
HOLDER = ("import sys; from pebr.run.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
          "print('held', flush=True); sys.stdin.read()")
# as a command's main() takes it: the library raises RunLockError, main turns it into one line and exit 1
TAKER = ("import sys; from pebr.run.cli import errors_as_exit; from pebr.run.lock import RunLock\n"
         "with errors_as_exit(): RunLock(sys.argv[1]).acquire()\nprint('taken', flush=True)")


def _holder(folder, tag):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), tag], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "stage1"
    tag = uuid.uuid4().hex  # shows in the command line the message must quote
    first = _holder(folder, tag)
    try:
        t0 = time.time()
        second = subprocess.run([sys.executable, "-c", TAKER, str(folder)], capture_output=True, text=True, env=ENV,
                                timeout=60)
        assert second.returncode == 1 and "taken" not in second.stdout
        msg = second.stderr.strip()
        assert len(msg.splitlines()) == 1, msg  # one line, no traceback
        assert f"pid {first.pid} " in msg and socket.gethostname() in msg and tag in msg and str(folder) in msg
        assert "started 20" in msg and "UTC" in msg
        assert time.time() - t0 < 30  # at once, not after waiting for the first to end
    finally:
        first.stdin.close()
        first.wait(timeout=30)
    # released at the first's end: the next one gets it, and the lock file lies empty
    done = subprocess.run([sys.executable, "-c", TAKER, str(folder)], capture_output=True, text=True, env=ENV,
                          timeout=60)
    assert done.returncode == 0 and "taken" in done.stdout, done.stderr
    assert (folder / LOCK_FILE).read_text() == ""


def test_lock_of_a_sigkilled_run_is_taken_over(tmp_path):
    folder = tmp_path / "stage0"
    first = _holder(folder, "x")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == first.pid  # left behind
    said = []
    with RunLock(folder, log=said.append) as lock:
        assert lock.held and json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "taking over" in said[0] and f"pid {first.pid} " in said[0]


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    """No fcntl (Windows): a dead pid's lock is taken over, a live one's or another host's refused."""
    monkeypatch.setattr(run_lock, "fcntl", None)
    folder = tmp_path / "s"
    os.makedirs(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        def plant(pid, host):
            body = {"pid": pid, "host": host, "started": "2026-01-01 00:00:00 UTC", "command": "python -m pebr.train"}
            (folder / LOCK_FILE).write_text(json.dumps(body))

        plant(alive.pid, socket.gethostname())
        with pytest.raises(RunLockError, match=f"pid {alive.pid} "):
            RunLock(folder).acquire()
        plant(12345, "some-other-host-" + uuid.uuid4().hex[:6])
        with pytest.raises(RunLockError, match="delete"):
            RunLock(folder).acquire()
        plant(dead.pid, socket.gethostname())
        said = []
        lock = RunLock(folder, log=said.append).acquire()
        assert said and f"pid {dead.pid} " in said[0]
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", "import sys; from pebr.run import lock as run_lock; run_lock.fcntl = None\n"
                                "from pebr.run.cli import errors_as_exit\n"
                                "with errors_as_exit(): run_lock.RunLock(sys.argv[1]).acquire()", str(folder)],
                               capture_output=True, text=True, env=ENV, timeout=60)
        assert other.returncode == 1 and f"pid {os.getpid()} " in other.stderr  # this live process holds it
        lock.release()
        assert not (folder / LOCK_FILE).exists()
    finally:
        alive.stdin.close()
        alive.wait()


class _FakeWorld:
    """Rank `rank` of a job whose rank 0 broadcast `said`."""

    def __init__(self, rank, said=None):
        self.rank, self.said = rank, said

    @property
    def is_main(self):
        return self.rank == 0

    def broadcast_object(self, obj):
        return obj if self.rank == 0 else self.said


def test_only_rank_zero_locks_and_every_rank_follows_it(tmp_path):
    folder = tmp_path / "stage2"
    with hold(folder, _FakeWorld(1, None)) as lock:  # rank 1: no lock file of its own, no wait
        assert lock is None and not (folder / LOCK_FILE).exists()
    with hold(folder, _FakeWorld(0)) as lock:
        assert lock.held
        with pytest.raises(RunLockError) as rank0:  # a second job's rank 0: the holder named
            with hold(folder, _FakeWorld(0)):
                pass
        assert f"pid {os.getpid()} " in str(rank0.value)
        with pytest.raises(RunLockError) as rank1:  # its rank 1 stops too, quietly (exit status 1)
            with hold(folder, _FakeWorld(1, str(rank0.value))):
                pass
        assert rank1.value.quiet and not rank0.value.quiet  # rank 1's command exits 1 without a second message
        assert isinstance(rank0.value, Exception) and not isinstance(rank0.value, SystemExit)  # a library error
    assert (folder / LOCK_FILE).read_text() == ""


def test_two_training_runs_on_one_output_dir(tmp_path):
    """A second pebr.train run on a folder in use stops at once naming the first; the first's
    metrics stay; after SIGKILL of the first, --resume takes its lock over and finishes."""
    from pebr import train
    from pebr.run.checkpoint import Checkpointer, load_trainer_state

    out = tmp_path / "run"
    args = ["--stage", "0", "--output-dir", str(out), "--no-progress", "--sft-items", "16", "--sft-batch", "2",
            "--save-every", "1"]
    first = subprocess.Popen([sys.executable, "-m", "pebr.train", *args, "--max-steps", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpts = out / "stage0" / "checkpoints"
    try:
        deadline = time.time() + 120
        while not (ckpts / "latest").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (ckpts / "latest").exists() and first.poll() is None, "the first run wrote no checkpoint"
        t0 = time.time()
        with pytest.raises(SystemExit) as second:  # in this process: its own open file, refused like any other
            train.main([*args, "--max-steps", "2"])
        msg = str(second.value.code)
        assert msg.startswith("error: ")
        assert f"pid {first.pid} " in msg and "in use by another run" in msg and len(msg.splitlines()) == 1
        assert time.time() - t0 < 20
        assert (out / "stage0" / "metrics.jsonl").exists() and first.poll() is None  # untouched, still running
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = load_trainer_state(Checkpointer(ckpts).latest())["step"]
    train.main([*args, "--max-steps", str(step + 1), "--resume"])
    log = (out / "stage0" / "train.log").read_text()
    assert "taking over the lock" in log and f"pid {first.pid} " in log and f"at step {step}" in log
    assert load_trainer_state(Checkpointer(ckpts).latest())["step"] == step + 1
    assert (out / "stage0" / LOCK_FILE).read_text() == ""  # released at the end
