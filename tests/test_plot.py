"""Metrics log (append, torn lines, resume truncation) and the plot CLI."""
import json
import os
import random
import subprocess
import sys

import matplotlib
import pytest
import torch
from PIL import Image

from pebr.run.metrics_log import MetricsLog, read_metrics
from pebr.plot import main
from pebr.report.metrics_plot import _matching_keys, plot_metrics

matplotlib.use("Agg")


def test_log_and_read(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog(str(path)) as log:
        rec = log.log(1, {"reward/overall": torch.tensor(0.5), "kl": float("nan"), "n": 3}, stage="perception")
        log.log(2, {"reward/overall": 0.75})
    assert rec == {"step": 1, "reward/overall": 0.5, "kl": None, "n": 3, "stage": "perception"}
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    assert read_metrics(str(tmp_path / "absent.jsonl")) == []


def test_torn_last_line_is_skipped_and_cut_on_reopen(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with MetricsLog(path) as log:
        log.log(1, {"a": 1.0})
        log.log(2, {"a": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 3, "a": 3.')  # the process died mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with MetricsLog(path) as log:  # reopening cuts the torn tail, so the next line is whole
        log.log(3, {"a": 3.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with open(path) as f:
        assert all(json.loads(line) for line in f)


def test_truncate_after_resume_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for s in range(1, 8):
        log.log(s, {"a": float(s)})
    assert log.truncate_after(4) == 3
    log.log(5, {"a": 50.0})  # the resumed run writes step 5 again
    log.close()
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["a"] == 50.0
    assert not os.path.exists(path + ".tmp")


def _fake_run(folder, *, keys=("reward/overall", "reward/accuracy", "kl", "response_length/mean")):
    with MetricsLog(os.path.join(folder, "metrics.jsonl")) as log:
        for s in range(1, 21):
            log.log(s, {k: s * 0.1 for k in keys}, stage="perception" if s <= 10 else "reasoning")


def test_plot_writes_png(tmp_path):
    _fake_run(str(tmp_path))
    out = str(tmp_path / "plot.png")
    assert main([str(tmp_path), "--out", out]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300
    assert main([str(tmp_path)]) == 0 and os.path.isfile(tmp_path / "metrics.png")


def test_plot_missing_keys_and_empty_log(tmp_path):
    _fake_run(str(tmp_path), keys=("loss",))
    assert main([str(tmp_path)]) == 0
    assert plot_metrics([], str(tmp_path / "empty.png")).endswith("empty.png")
    assert main([str(tmp_path / "nowhere")]) == 2


def test_panel_key_matching():
    records = [{"step": 1, "stage2/reward/overall": 1.0, "ppo_kl": 0.1, "actor/kl": 0.2, "response_length/mean": 9,
                "reward/accuracy": 1.0, "stage": "x"}]
    assert _matching_keys(records, "reward/overall") == ["stage2/reward/overall"]
    assert _matching_keys(records, "kl") == ["actor/kl"]
    assert _matching_keys(records, "response_length") == ["response_length/mean"]
    assert _matching_keys(records, "accuracy") == ["reward/accuracy"]
    assert _matching_keys([{"step": 1, "kl": 0.0, "actor/kl": 1.0}], "kl") == ["kl"]


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "pebr.plot", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "RUN_DIR" in out.stdout and "--out" in out.stdout


def test_append_record_with_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with MetricsLog(path) as log:
        log.append({"step": 7, "kl": 0.25})
        with pytest.raises(ValueError, match="step"):
            log.append({"kl": 0.1})
    assert read_metrics(path) == [{"step": 7, "kl": 0.25}]


# ---- whole runs: the figure `main` saves is captured and inspected, not only the file


@pytest.fixture
def saved(monkeypatch):
    """The figures saved by pebr.plot, in order (captured at Figure.savefig)."""
    figs = []
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        figs.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return figs


def _panels(fig) -> dict:
    """{title: [(label, xdata)]} of the figure's visible axes."""
    return {ax.get_title(): [(ln.get_label(), list(ln.get_xdata())) for ln in ax.get_lines() if ln.get_label()[0] != "_"]
            for ax in fig.axes if ax.get_visible()}


def _sft_stage(folder, n, rng):
    # the keys pebr.trainers.sft.SFTTrainer.train_step logs (+ trainer.step_metrics, world_size)
    with MetricsLog(os.path.join(folder, "metrics.jsonl")) as log:
        for s in range(1, n + 1):
            log.log(s, {"loss": 6.0 / s + rng.random(), "grad_norm": rng.random(), "skipped": 0, "epoch": 0,
                        "step_time_s": 0.5, "tokens_per_s": 4000.0, "peak_mem_mb": 800.0, "lr": 1e-3, "world_size": 1})


def _grpo_stage(folder, n, rng):
    # the keys pebr.trainers.grpo.GRPOTrainer.train_step logs (a subset)
    with MetricsLog(os.path.join(folder, "metrics.jsonl")) as log:
        for s in range(1, n + 1):
            log.log(s, {"epoch": 0, "reward/overall": rng.random(), "accuracy": rng.random(), "response_length": 70.0,
                        "reward/format": 1.0, "loss": -0.01, "kl": rng.random() / 10, "ppo_kl": 0.001,
                        "entropy": 0.4, "grad_norm": 0.9, "skipped": 0, "lr": 2e-4, "world_size": 1})


def _run(root, rng):
    n = [rng.randint(3, 30) for _ in range(3)]
    _sft_stage(os.path.join(root, "stage0"), n[0], rng)
    _grpo_stage(os.path.join(root, "stage1"), n[1], rng)
    _grpo_stage(os.path.join(root, "stage2"), n[2], rng)
    os.makedirs(os.path.join(root, "sampling"))  # a run folder holds it too: not a stage
    return n


def test_run_folder_plots_every_stage_end_to_end(tmp_path, saved):
    n0, n1, n2 = _run(str(tmp_path), random.Random())
    assert main([str(tmp_path)]) == 0
    with Image.open(tmp_path / "metrics.png") as img:
        assert img.format == "PNG"
    panels = _panels(saved[-1])
    assert all(panels.values()), f"empty panels drawn: {panels.keys()}"
    # SFT loss: stage 0 only (the GRPO loss is another quantity), one point per step
    assert panels["SFT loss"] == [("loss (stage0)", list(range(1, n0 + 1)))]
    # GRPO panels: one line per stage, stage 1 after stage 0's last step, stage 2 after stage 1's
    for title in ("reward/overall", "accuracy", "kl", "entropy", "response_length"):
        assert [label for label, _ in panels[title]] == [f"{title} (stage1)", f"{title} (stage2)"]
        (_, x1), (_, x2) = panels[title]
        assert x1 == list(range(n0 + 1, n0 + n1 + 1)) and x2 == list(range(n0 + n1 + 1, n0 + n1 + n2 + 1))


def test_stage0_alone_draws_the_loss_and_no_empty_panel(tmp_path, saved, capsys):
    n0 = random.randint(2, 40)
    _sft_stage(str(tmp_path / "stage0"), n0, random.Random())
    for arg in (tmp_path / "stage0", tmp_path / "stage0" / "metrics.jsonl"):  # a stage folder and its file
        assert main([str(arg)]) == 0
        assert _panels(saved[-1]) == {"SFT loss": [("loss", list(range(1, n0 + 1)))]}
    assert os.path.isfile(tmp_path / "stage0" / "metrics.png")  # a file's default: its name with .png
    assert "SFT loss" in capsys.readouterr().out


def test_half_written_last_line_is_skipped_and_counted(tmp_path, saved, capsys):
    n1 = random.randint(2, 20)
    _grpo_stage(str(tmp_path / "stage1"), n1, random.Random())
    with open(tmp_path / "stage1" / "metrics.jsonl", "a") as f:
        f.write('{"step": %d, "reward/overall": 0.' % (n1 + 1))  # the run was killed mid-line
    out = str(tmp_path / "elsewhere" / "plot.png")
    assert main([str(tmp_path), "--out", out]) == 0 and os.path.isfile(out)
    assert [len(x) for _, x in _panels(saved[-1])["reward/overall"]] == [n1]
    assert "skipped 1 malformed line" in capsys.readouterr().out


def test_no_data_says_so(tmp_path, saved):
    plot_metrics([], str(tmp_path / "empty.png"))
    fig = saved[-1]
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 1 and not visible[0].get_lines()
    assert [t.get_text() for t in visible[0].texts] == ["no data"]
