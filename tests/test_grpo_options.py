"""The GRPO option names have one definition (engine/grpo_options.py); every copy agrees with it.

The kernels receive an option as a string and branch on its integer code, the name's position in
the list. Three places hold the list: engine/grpo_options.py (Python: the wrappers, the reference),
csrc/grpo_math.h (C++ and CUDA: `k...Names[]` in code order next to an enum of the codes), and the
Triton launchers (`{name: code}` dicts; triton_kernels may not import engine). A name added or
reordered in one place and not the others would run the wrong formula silently: these tests fail
instead.
"""
import os
import re

import pytest
import torch

import engine
from engine import grpo_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "grpo_math.h")

# (Python tuple, header name array, header enum, Triton module, Triton dict)
OPTIONS = [
    ("KL_TYPES", "kKlTypeNames", "KlType", "triton_kernels.grpo_loss", "KL_TYPES"),
    ("LOSS_AGGS", "kLossAggNames", "LossAgg", "triton_kernels.grpo_loss", "LOSS_AGGS"),
    ("ADVANTAGE_SCALES", "kAdvantageScaleNames", "AdvantageScale", "triton_kernels.group_advantages", "ADVANTAGE_SCALES"),
]
IDS = [o[0] for o in OPTIONS]


def _header() -> str:
    with open(HEADER) as f:
        return re.sub(r"//[^\n]*", "", f.read())  # comments may quote names


def _header_names(array: str) -> list[str]:
    m = re.search(r"\b" + array + r"\[\]\s*=\s*\{([^}]*)\}", _header())
    assert m, f"csrc/grpo_math.h has no array {array}[]"
    return re.findall(r'"([^"]*)"', m.group(1))


def _header_enum(enum: str) -> list[tuple[str, int]]:
    m = re.search(r"\benum\s+" + enum + r"\s*\{([^}]*)\}", _header())
    assert m, f"csrc/grpo_math.h has no enum {enum}"
    members = [x.strip() for x in m.group(1).split(",") if x.strip()]
    out = []
    for member in members:
        name, _, value = member.partition("=")
        assert value.strip(), f"enum {enum}: give {name.strip()} an explicit code"
        out.append((name.strip(), int(value.strip())))
    return out


def test_python_lists_are_tuples_of_unique_names():
    for py, *_ in OPTIONS:
        names = getattr(grpo_options, py)
        assert isinstance(names, tuple) and len(set(names)) == len(names) and all(isinstance(n, str) for n in names)


@pytest.mark.parametrize("py,array,enum,_mod,_dict", OPTIONS, ids=IDS)
def test_header_names_match_in_order(py, array, enum, _mod, _dict):
    assert tuple(_header_names(array)) == getattr(grpo_options, py)


@pytest.mark.parametrize("py,array,enum,_mod,_dict", OPTIONS, ids=IDS)
def test_header_codes_are_the_positions(py, array, enum, _mod, _dict):
    codes = [value for _, value in _header_enum(enum)]
    assert codes == list(range(len(getattr(grpo_options, py)))), f"enum {enum} codes {codes}"


@pytest.mark.parametrize("py,_array,_enum,module,attr", OPTIONS, ids=IDS)
def test_triton_copies_match_in_order(py, _array, _enum, module, attr):
    pytest.importorskip("triton")
    import importlib

    table = getattr(importlib.import_module(module), attr)
    names = getattr(grpo_options, py)
    assert list(table.items()) == [(name, code) for code, name in enumerate(names)]


def test_wrappers_and_reference_use_the_one_definition():
    import engine.group_advantages
    import engine.grpo_loss

    assert engine.grpo_loss.KL_TYPES is grpo_options.KL_TYPES
    assert engine.grpo_loss.LOSS_AGGS is grpo_options.LOSS_AGGS
    assert engine.group_advantages.ADVANTAGE_SCALES is grpo_options.ADVANTAGE_SCALES


def test_cpp_kernels_accept_exactly_the_names():
    """The built kernels parse the header's names: each one is accepted, anything else is a ValueError."""
    if "cpp" not in engine.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    logp, adv, mask = torch.randn(2, 3), torch.randn(2), torch.ones(2, 3, dtype=torch.bool)
    fwd = torch.ops.engine.grpo_loss_fwd
    for kl_type in grpo_options.KL_TYPES:
        for loss_agg in grpo_options.LOSS_AGGS:
            fwd(logp, adv, mask, None, logp, 0.2, 0.3, 3.0, 0.1, kl_type, loss_agg)
    for scale in grpo_options.ADVANTAGE_SCALES:
        torch.ops.engine.group_advantages_fwd(torch.rand(4), 2, scale, 1e-6)
    for bad, arg in (("KL", "kl_type"), ("token_mean", "loss_agg")):
        kw = dict(kl_type="kl", loss_agg="token-mean")
        kw[arg] = bad
        with pytest.raises(ValueError, match=arg):
            fwd(logp, adv, mask, None, logp, 0.2, 0.3, 3.0, 0.1, kw["kl_type"], kw["loss_agg"])
    with pytest.raises(ValueError, match="scale"):
        torch.ops.engine.group_advantages_fwd(torch.rand(4), 2, "Group", 1e-6)
