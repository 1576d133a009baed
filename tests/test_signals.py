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


# ---- outside the training loop: the warm-up's data loading, dataset-level sampling (pebr.run.signals)

class _ReachedTheTest(Exception):
    pass


@pytest.fixture
def signals_guarded():
    """A signal the code under test does not handle raises here instead of ending pytest (SIGTERM's
    default) or looking like a test's own Ctrl-C."""
    def guard(signum, frame):
        raise _ReachedTheTest(f"{signal.Signals(signum).name} reached the test: nothing handled it")

    previous = {s: signal.signal(s, guard) for s in (signal.SIGTERM, signal.SIGINT)}
    yield guard
    for s, h in previous.items():
        signal.signal(s, h)


def _lock_free(folder):
    lock = folder / ".pebr-run.lock"
    return not lock.exists() or lock.read_text() == ""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_warm_up_loads_its_data(tmp_path, monkeypatch, capsys, signals_guarded, sig, code):
    from pebr import train
    from pebr.recipe import items as items_module

    real = items_module.load_items

    def load_items(*args, **kwargs):
        os.kill(os.getpid(), sig)  # the scheduler's SIGTERM (or Ctrl-C) arrives while items are read
        return real(*args, **kwargs)

    monkeypatch.setattr(items_module, "load_items", load_items)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "0", "--output-dir", str(out), "--no-progress", "--sft-items", "8", "--sft-batch", "4",
                    "--max-steps", "2"])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"stopped by {signal.Signals(sig).name} during the warm-up's set-up (loading "
                                            f"its policy and data); no step of it had run and nothing half-written "
                                            f"was kept; run the command again") and "Traceback" not in err
    stage = out / "stage0"
    assert _lock_free(stage) and not (stage / "metrics.jsonl").exists()
    assert not [n for n in os.listdir(stage / "checkpoints") if not n.startswith(".pebr")]
    assert signal.getsignal(signal.SIGTERM) is signals_guarded  # the handlers given back


def test_a_signal_while_the_sampling_is_written_keeps_no_cache(tmp_path, monkeypatch, capsys, signals_guarded):
    """SIGTERM in the middle of writing rollouts.jsonl: no file of the sampling is left visible, an
    earlier sampling's splits.json neither (it would mark the new rollouts as a finished sampling),
    both locks are released, one line and 143."""
    from pebr import train
    from pebr.model.policy import build_tiny_policy
    from pebr.recipe import splits

    model = tmp_path / "tiny"
    build_tiny_policy(seed=0).save(str(model))
    out = tmp_path / "run"
    (out / "sampling").mkdir(parents=True)
    earlier = {"k": 1, "counts": {"easy": 0, "medium": 0, "hard": 0}, "meta": {"model": "another"}, "n_correct": {},
               "easy": [], "medium": [], "hard": []}
    (out / "sampling" / "splits.json").write_text(json.dumps(earlier))  # an earlier sampling, not reused
    rows = []

    class SignalOnThirdRow(list):  # the sampled rollouts, as write_sampling reads them row by row
        def __iter__(self):
            for row in list.__iter__(self):
                rows.append(row)
                if len(rows) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield row

    real_sample = splits.sample_dataset

    def sample_dataset(*args, **kwargs):
        result = real_sample(*args, **kwargs)
        result.rollouts = SignalOnThirdRow(result.rollouts)
        return result

    monkeypatch.setattr(splits, "sample_dataset", sample_dataset)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "1", "--model", str(model), "--output-dir", str(out), "--no-progress", "-n", "2",
                    "--rollout-batch", "2", "--mini-batch", "2", "--micro-batch", "4", "--max-new-tokens", "8",
                    "--sampling-items", "4", "--sampling-k", "2", "--split", "easy", "--max-steps", "1"])
    monkeypatch.undo()
    assert e.value.code == 143 and len(rows) == 3  # stopped at the row it was writing
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM during dataset-level sampling; the sampling was "
                                                   "not cached") and "Traceback" not in err
    assert sorted(os.listdir(out / "sampling")) == [".pebr-run.lock"]  # no rollouts, no splits, no temp file
    assert _lock_free(out / "sampling") and _lock_free(out / "stage1")
    assert not (out / "stage1" / "checkpoints").exists() or not os.listdir(out / "stage1" / "checkpoints")


def test_sigterm_during_pebr_sample(tmp_path):
    """The real thing: `python -m pebr.sample` gets SIGTERM while it samples (its lock is taken just
    before the first rollout)."""
    from pebr.model.policy import build_tiny_policy

    model = tmp_path / "tiny"
    build_tiny_policy(seed=0).save(str(model))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pebr.sample", "--model", str(model), "--output-dir", str(out),
                             "--num-items", "400", "-k", "8", "--max-new-tokens", "64", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    lock = out / "sampling" / ".pebr-run.lock"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(0.5)  # well into the rollouts
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM during dataset-level sampling;") and "Traceback" not in err
    assert sorted(os.listdir(out / "sampling")) == [".pebr-run.lock"] and lock.read_text() == ""


def test_outside_the_loop_a_second_signal_exits_at_once(monkeypatch, signals_guarded):
    from pebr.errors import Interrupted
    from pebr.run import signals

    with pytest.raises(Interrupted, match="stopped by SIGINT during inner; then") as first:
        with signals.stop_on_signals("outer"), signals.stop_on_signals("inner", then="then"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except Exception:  # noqa: BLE001  (a reader's `except Exception` on the way does not swallow it)
                raise AssertionError("a signal was taken for an error") from None
    assert first.value.signum == signal.SIGINT
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(signals.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        with signals.stop_on_signals("outer"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            finally:  # the clean-up (a lock released, a temp file removed), when the second one comes
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
    assert exits == [143] and signal.getsignal(signal.SIGTERM) is signals_guarded
