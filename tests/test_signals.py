"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) during training: the run finishes its
step, saves a checkpoint, releases its lock, prints one line and exits 143 / 130; --resume goes on
from that step and loses nothing; a second signal exits at once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
ARGS = ["--stage", "0", "--no-progress", "--sft-items", "16", "--sft-batch", "2", "--save-every", "1000"]


def _start(out, steps, *more):
    return subprocess.Popen([sys.executable, "-m", "pebr.train", *ARGS, "--output-dir", str(out), "--max-steps", str(steps),
                             *more],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def _wait_for_steps(proc, metrics, n, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run wrote fewer than {n} steps (exit {proc.poll()})")


def _steps(metrics):
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_step_and_resume_loses_nothing(tmp_path, sig, code):
    out = tmp_path / "run"
    metrics = out / "stage0" / "metrics.jsonl"
    proc = _start(out, 300)
    _wait_for_steps(proc, metrics, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(sig).name} after step ") and "Traceback" not in err, err
    stopped = int(last.split("after step ")[1].split(";")[0])
    assert _steps(metrics) == list(range(1, stopped + 1))  # every step it ran is on record
    ckpt = out / "stage0" / "checkpoints" / f"step_{stopped:07d}"
    assert ckpt.is_dir() and (out / "stage0" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert not (out / "stage0" / ".pebr-run.lock").exists() or (out / "stage0" / ".pebr-run.lock").read_text() == ""
    resumed = _start(out, stopped + 2, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _steps(metrics) == list(range(1, stopped + 3))  # goes on from the saved step, nothing twice
    assert f"resumed from {ckpt} at step {stopped}" in (out / "stage0" / "train.log").read_text()


def test_a_second_signal_exits_at_once(monkeypatch):
    from pebr.trainers import base

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(base.os, "_exit", fake_exit)
    before = signal.getsignal(signal.SIGTERM)
    stop = base.StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
        assert stop.agreed(None) == signal.SIGTERM and not exits  # the first: noted, the step goes on
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert exits == [143]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
