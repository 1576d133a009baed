"""A checkpoint records its files' sizes and checksums (manifest.json) and is verified before use:
one truncated or changed file in the newest checkpoint makes `latest`, `--resume` and `--model`
fall back to the newest checkpoint that verifies, saying which was skipped and why."""
import json
import logging
import os
import shutil

import pytest

from pebr import train
from pebr.run.checkpoint import MANIFEST_FILE, find_latest, verify
from pebr.run.model_path import resolve_model_path

ARGS = ["--stage", "0", "--no-progress", "--sft-items", "8", "--sft-batch", "4", "--save-every", "1",
        "--keep-checkpoints", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "run"
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "3"])
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, dst / "stage0" / "checkpoints"


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _corrupt_middle_free(path):
    """Same size, first bytes changed: the checksum must see it."""
    with open(path, "r+b") as f:
        head = f.read(8)
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in head))


def _one(root, pattern):
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            if pattern(n):
                return os.path.join(dirpath, n)
    raise AssertionError(f"no file like that under {root}")


KINDS = {
    "model weights": lambda n: n.endswith(".safetensors"),
    "trainer state": lambda n: n == "trainer_state.json",
    "rng": lambda n: n.startswith("rng_rank"),
    "optimizer shard": lambda n: n.endswith(".distcp"),
    "tokenizer": lambda n: n == "tokenizer.json",
}


def test_every_checkpoint_has_a_manifest_that_verifies(run):
    ckpts = run / "stage0" / "checkpoints"
    for step in (1, 2, 3):
        folder = ckpts / f"step_{step:07d}"
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        assert any(k.endswith(".safetensors") for k in files) and "trainer_state.json" in files
        assert any(k.startswith("optimizer") for k in files) and verify(str(folder)) is None


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_a_damaged_newest_checkpoint_is_skipped(run, tmp_path, caplog, kind, damage):
    out, ckpts = _copy(run, tmp_path)
    bad = _one(ckpts / "step_0000003", KINDS[kind])
    (_truncate if damage == "truncated" else _corrupt_middle_free)(bad)
    why = verify(str(ckpts / "step_0000003"))
    assert why is not None and os.path.relpath(bad, ckpts / "step_0000003") in why
    with caplog.at_level(logging.WARNING, logger="pebr"):
        assert find_latest(ckpts) == str(ckpts / "step_0000002")
    assert "step_0000003" in caplog.text and "does not verify" in caplog.text
    assert resolve_model_path(str(out / "stage0")) == str(ckpts / "step_0000002")  # --model takes the good one


def test_resume_continues_from_the_newest_good_checkpoint(run, tmp_path):
    out, ckpts = _copy(run, tmp_path)
    _truncate(_one(ckpts / "step_0000003", KINDS["model weights"]))
    train.main([*ARGS, "--output-dir", str(out), "--max-steps", "4", "--resume"])
    log = (out / "stage0" / "train.log").read_text()
    assert f"resumed from {ckpts / 'step_0000002'} at step 2" in log
    assert find_latest(ckpts) == str(ckpts / "step_0000004") and verify(str(ckpts / "step_0000003")) is None  # redone
    steps = [json.loads(line)["step"] for line in (out / "stage0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_checkpoint_without_manifest_still_loads(run, tmp_path):
    """Checkpoints written before manifests existed are taken as they are."""
    out, ckpts = _copy(run, tmp_path)
    os.remove(ckpts / "step_0000003" / MANIFEST_FILE)
    assert verify(str(ckpts / "step_0000003")) is None and find_latest(ckpts) == str(ckpts / "step_0000003")
