"""A model folder is data: pebr never runs its Python. A folder whose config.json names custom code
(`auto_map`) is refused with one line, before transformers could ask on a terminal whether to run
it; a malformed config.json or tokenizer file is an error naming the file, not a bare JSON error."""
import json
import os
import shutil

import pytest

from pebr import train
from pebr.errors import CheckpointError
from pebr.model.context_limits import text_only_policy
from pebr.model.policy import build_tiny_policy, load_policy


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    build_tiny_policy(seed=0).save(str(path))
    return path


def _copy(saved, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(saved, dst)
    return dst


def test_a_folder_with_custom_code_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path, "remote")
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    for load in (load_policy, text_only_policy):
        with pytest.raises(CheckpointError, match="names custom code") as e:
            load(str(folder))
        assert "config.json" in str(e.value)
    with pytest.raises(SystemExit) as e:  # the command: one line
        train.main(["--stage", "2", "--model", str(folder), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert str(e.value.code).startswith("error: ") and "custom code" in str(e.value.code)
    assert not marker.exists()
    assert load_policy(str(saved)).model is not None  # the same folder without auto_map loads


def test_malformed_json_names_the_file(saved, tmp_path):
    folder = _copy(saved, tmp_path, "bad_config")
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl",')
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable JSON config"):
        load_policy(str(folder))
    folder = _copy(saved, tmp_path, "bad_tokenizer")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer files do not load") as e:
        load_policy(str(folder))
    assert str(folder) in str(e.value)
    os.remove(tmp_path / "bad_config" / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_policy(str(tmp_path / "bad_config"))
