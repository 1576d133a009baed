"""Checkpoints against tampering and full disks: RNG states load with weights_only=True and give
the same draws; a planted pickle is refused before it runs (RNG file, legacy trainer state,
optimizer metadata, and through --resume); `latest` never leads outside its folder; a save on a
full disk says "no space left on device", leaves no temp folder, and the previous checkpoint loads."""
import errno
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from pebr import train
from pebr.model.policy import build_tiny_policy, load_policy
from pebr.run.checkpoint import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    Checkpointer,
    CheckpointError,
    find_latest,
    load_trainer_state,
    write_manifest,
)
from pebr.run.model_path import resolve_model_path
from pebr.run.rng import rng_state, set_rng_state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_policy(seed=0).save(path)
    return load_policy(path)


@pytest.fixture
def saved(tmp_path, tiny):
    """A checkpointer holding step 1 (model, optimizer, RNG)."""
    ck = Checkpointer(tmp_path / "ck")
    opt = torch.optim.AdamW(tiny.model.parameters(), lr=1e-3)
    ck.save(1, tiny, {"step": 1}, optimizer=opt, rng=rng_state())
    return ck, opt


def _draws():
    return (random.random(), random.gauss(0, 1), random.getrandbits(64), np.random.randn(3).tobytes(),
            np.random.randint(0, 2**31, 4).tobytes(), torch.rand(5).numpy().tobytes(), torch.randn(3).numpy().tobytes())


def test_rng_round_trip_with_weights_only(tmp_path, saved):
    ck, _ = saved
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.gauss(0, 1)  # a cached second Gaussian in both: part of the state
    np.random.randn(1)
    path = ck.save(2, load_policy(ck.latest()), {"step": 2}, rng=rng_state())
    expected = _draws()
    random.seed(seed + 1)
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    state = torch.load(os.path.join(path, "rng_rank0.pt"), weights_only=True)  # no allow-list needed
    set_rng_state(state)
    assert _draws() == expected  # bitwise: the bytes of every draw
    set_rng_state(ck.load_rng(path, 0))
    assert _draws() == expected


def test_rng_file_of_an_older_version_still_loads(tmp_path, saved):
    """Checkpoints written before the tensor format hold getstate()'s tuples and NumPy's key array:
    read with weights_only=True (NumPy's array allowed, nothing else), the same draws follow."""
    ck, _ = saved
    path = ck.latest()
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               os.path.join(path, "rng_rank0.pt"))
    expected = _draws()
    torch.manual_seed(seed + 1)
    set_rng_state(ck.load_rng(path, 0))
    assert _draws() == expected


class _Planted:
    """Unpickling this creates the file `marker` (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["rng", "legacy_state", "optimizer_metadata"])
def test_planted_pickle_is_not_executed(tmp_path, saved, tiny, where):
    ck, opt = saved
    path = ck.latest()
    marker = str(tmp_path / f"pwned-{os.urandom(4).hex()}")
    if where == "rng":
        with open(os.path.join(path, "rng_rank0.pt"), "wb") as f:
            pickle.dump({"python": _Planted(marker)}, f, protocol=2)
        load = lambda: ck.load_rng(path, 0)  # noqa: E731
    elif where == "legacy_state":  # a checkpoint of the format before trainer_state.json
        os.remove(os.path.join(path, STATE_FILE))
        torch.save({"step": 1, "rng": _Planted(marker)}, os.path.join(path, LEGACY_STATE_FILE))
        load = lambda: load_trainer_state(path)  # noqa: E731
    else:
        with open(os.path.join(path, "optimizer", ".metadata"), "wb") as f:
            pickle.dump(_Planted(marker), f, protocol=2)
        load = lambda: ck.load_optimizer(path, tiny.model, opt, {"step": 1})  # noqa: E731
    with pytest.raises(CheckpointError, match="refusing to load"):
        load()
    assert not os.path.exists(marker)


def test_resume_refuses_a_planted_rng_file(tmp_path):
    out = tmp_path / "run"
    args = ["--stage", "0", "--output-dir", str(out), "--no-progress", "--sft-items", "8", "--sft-batch", "4"]
    train.main([*args, "--max-steps", "1"])
    latest = find_latest(out / "stage0" / "checkpoints")
    marker = str(tmp_path / "pwned")
    with open(os.path.join(latest, "rng_rank0.pt"), "wb") as f:
        pickle.dump(_Planted(marker), f, protocol=2)
    # the checkpoint's manifest sees the file changed: --resume refuses, naming it (one line, no traceback)
    with pytest.raises(SystemExit, match="^error: --resume: no checkpoint .* verifies .*rng_rank0.pt is [0-9]+ bytes"):
        train.main([*args, "--max-steps", "2", "--resume"])
    write_manifest(latest)  # a planter who rewrites the manifest too still meets the loader's refusal
    with pytest.raises(SystemExit, match="^error: refusing to load .*rng_rank0.pt"):
        train.main([*args, "--max-steps", "2", "--resume"])
    assert not os.path.exists(marker)


def _complete(folder):
    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", STATE_FILE):
        with open(os.path.join(folder, name), "w") as f:
            f.write('{"step": 1}')


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested", "symlink"])
def test_latest_never_leads_outside_its_folder(tmp_path, kind):
    root = tmp_path / "out" / "stage1" / "checkpoints"
    _complete(root / "step_0000001")
    outside = tmp_path / "elsewhere" / "step_0000009"
    _complete(outside)  # a complete checkpoint the pointer must not reach
    name = {"dotdot": "../../..", "absolute": str(outside), "nested": "step_0000001/../../../elsewhere/step_0000009",
            "symlink": "step_0000009"}[kind]
    if kind == "symlink":
        os.symlink(outside, root / "step_0000009")
    (root / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="refusing to follow"):
        find_latest(root)
    with pytest.raises(ValueError, match="refusing to follow"):  # --model OUT/stage1 or its latest file
        resolve_model_path(str(root / "latest"))
    with pytest.raises(SystemExit, match="refusing to follow"):
        train.main(["--stage", "2", "--model", str(tmp_path / "out" / "stage1"), "--output-dir", str(tmp_path / "o")])
    (root / "latest").write_text("step_0000001\n")
    assert find_latest(root) == str(root / "step_0000001")
    if kind == "symlink":  # a link leading out is no checkpoint of this folder, pointer or not
        os.remove(root / "latest")
        assert find_latest(root) == str(root / "step_0000001") and Checkpointer(root).steps() == [1]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["safetensors", "torch_save", "state_json"])
def test_disk_full_save(saved, tiny, monkeypatch, writer):
    """The writer fails as on a full disk: ENOSPC (safetensors' words or json's), or torch.save's
    `basic_ios::clear: iostream error` that names no cause (then the free space tells)."""
    ck, opt = saved
    policy = tiny
    if writer == "safetensors":
        import transformers.modeling_utils as mu

        def full(tensors, filename, metadata=None):
            with open(filename, "wb") as f:  # a partial file first, as a real full disk leaves
                f.write(b"\0" * 1000)
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               "message: \"No space left on device\" })")

        monkeypatch.setattr(mu, "safe_save_file", full)
    elif writer == "torch_save":
        real_save = torch.save

        def full(obj, f, *a, **k):
            if not isinstance(f, (str, os.PathLike)):  # dcp serializes into memory buffers: not the disk
                return real_save(obj, f, *a, **k)
            with open(f, "wb") as fh:
                fh.write(b"PK")
            raise RuntimeError("basic_ios::clear: iostream error")

        monkeypatch.setattr(torch, "save", full)
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    else:
        import json

        monkeypatch.setattr(json, "dump", _enospc)
    with pytest.raises(OSError) as exc:
        ck.save(2, policy, {"step": 2}, optimizer=opt, rng=rng_state())
    assert exc.value.errno == errno.ENOSPC and "no space left on device" in str(exc.value)
    assert "step_0000001" in str(exc.value)  # what `latest` still names
    monkeypatch.undo()
    assert not [n for n in os.listdir(ck.root) if n.startswith(".tmp-")]
    assert ck.steps() == [1] and ck.latest().endswith("step_0000001")
    load_policy(ck.latest())
    assert load_trainer_state(ck.latest())["step"] == 1 and ck.load_rng(ck.latest(), 0) is not None
    ck.save(2, policy, {"step": 2}, optimizer=opt, rng=rng_state())  # space again: saves as usual
    assert ck.latest().endswith("step_0000002")
