"""README's "Loading a checkpoint with transformers" runs as written, and prompts as training does.

The snippets are taken from README.md between their markers, so the README stays true: run in a
subprocess on a saved tiny policy, they must generate, and build the same inputs (token ids, image
token types, pixels, grid) as `Policy.encode_prompts` for the same image and question.
"""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pebr.model.policy import build_tiny_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DUMP = """
import torch as _torch
from transformers.utils import is_torchvision_available as _tv
_torch.save({"inputs": {k: v for k, v in inputs.items()}, "question": question, "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
             "image_processor": type(image_processor).__name__, "torchvision": _tv()}, OUT)
"""


def readme_snippet(marker: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    found = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert found, f"README.md has no python block between <!-- {marker} --> markers"
    return found.group(1)


def _replace(code: str, old: str, new: str) -> str:
    assert old in code, f"the README snippet no longer contains {old!r}"
    return code.replace(old, new)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    policy = build_tiny_policy(seed=int(torch.randint(0, 1000, ()).item()))
    policy.save(folder)
    return policy, folder


def _run_readme(markers, saved, tmp_path) -> dict:
    policy, folder = saved
    # Larger than the tiny policy's max_pixels (112 x 112): the saved config's resize bounds matter.
    h, w = (int(x) for x in torch.randint(120, 260, (2,)))
    image_path = tmp_path / "figure.png"
    Image.fromarray(np.random.default_rng(int(torch.randint(0, 2**31, ()))).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
    code = "\n".join(readme_snippet(m) for m in markers)
    code = _replace(code, '"runs/stage2/checkpoints/step_0000150"', repr(str(folder)))
    code = _replace(code, '"figure.png"', repr(str(image_path)))
    code = _replace(code, "max_new_tokens=512", "max_new_tokens=4")
    out = tmp_path / "dump.pt"
    result = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + code + _DUMP], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    dump = torch.load(out)
    assert dump["new_tokens"] >= 1
    # Same prompt as training's: the README's instruction is pebr.data.prompts' and its template the folder's.
    with Image.open(image_path) as im:
        batch = policy.encode_prompts([im.convert("RGB")], [dump["question"]])
    got = dump["inputs"]
    torch.testing.assert_close(got["input_ids"], batch.input_ids, rtol=0, atol=0)
    torch.testing.assert_close(got["mm_token_type_ids"].int(), batch.mm_token_type_ids.int(), rtol=0, atol=0)
    torch.testing.assert_close(got["image_grid_thw"].long(), batch.image_grid_thw, rtol=0, atol=0)
    torch.testing.assert_close(got["pixel_values"].float(), batch.pixel_values.float(), rtol=0, atol=1e-5)
    return dump


def test_readme_generates_from_a_saved_checkpoint_with_transformers_alone(saved, tmp_path):
    dump = _run_readme(["hf-generate"], saved, tmp_path)
    assert dump["image_processor"] == "Qwen2VLImageProcessorPil"
    if importlib.util.find_spec("torchvision") is None:  # this venv: the snippet needs no torchvision
        assert dump["torchvision"] is False


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="AutoProcessor needs torchvision")
def test_readme_processor_snippet_with_torchvision(saved, tmp_path):
    _run_readme(["hf-generate", "hf-processor"], saved, tmp_path)
