"""Metrics log (append, torn lines, resume truncation) and the plot CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pebr.metrics_log import MetricsLog, read_metrics
from pebr.plot import _matching_keys, main, plot_metrics


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
