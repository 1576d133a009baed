"""LoRA through PEFT: the base frozen, rank-r adapters trained, and the KL reference the same model
with its adapters switched off (no second copy of the weights).

    wrapper = add_lora(policy.model, rank=16, alpha=32.0)   # PEFT's LoRA layers injected in place
    with adapters_disabled(policy.model):                   # the base model, bit for bit
        ref_logp = ...
    save_adapter(wrapper, "ckpt/adapter", state_dict=sd, base="runs/stage0/...")   # PEFT's format
    merged = merged_state_dict(sd, scaling=alpha / rank)     # W + (alpha / r) B A, the plain model's names

Why in place: `peft.get_peft_model` swaps each target `nn.Linear` of the model for a LoRA layer and
returns a `PeftModel` around the same model object. Everything of ours keeps calling the model as
before (`model.model` for the decoder, `model.get_output_embeddings()` for the fused LM-head op,
FSDP's blocks): `policy.model` stays transformers' class, and the wrapper (`policy.adapter`) is
kept only to save the adapter in PEFT's format. The LM head and the embeddings are never targets:
the head stays full-rank and frozen and still goes through `engine.ops.linear_token_logprobs`
(which then computes no weight gradient at all).

Targets: the decoder's attention and MLP projections by default (`DECODER_PROJECTIONS`, matched
inside `model.language_model.layers.*` only: the vision blocks' MLP uses the same names);
`vision=True` adds the vision blocks' attention and MLP projections. The merger, embeddings,
norms and head are frozen either way.
"""
from __future__ import annotations

import contextlib
import os
import re

import torch

DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_PROJECTIONS = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ADAPTER_DIR = "adapter"  # a checkpoint's PEFT folder (adapter_config.json + adapter_model.safetensors)
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's parameter names


def target_pattern(targets=DECODER_PROJECTIONS, *, vision: bool = False) -> str:
    """PEFT's `target_modules` as one regex (full match on module names): the decoder layers'
    `targets`, and with `vision` the vision blocks' attention and MLP projections."""
    unknown = [t for t in targets if t not in DECODER_PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"lora targets must be among {', '.join(DECODER_PROJECTIONS)}, got {', '.join(targets) or 'none'}")
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    if vision:
        pattern += rf"|.*visual\.blocks\.\d+\.({'|'.join(re.escape(t) for t in VISION_PROJECTIONS)})"
    return pattern


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
             targets=DECODER_PROJECTIONS, vision: bool = False):
    """Inject LoRA layers (PEFT) into `model` in place; freeze everything but the adapters -> the
    PeftModel around `model` (for save_adapter). A fresh adapter starts as the base model exactly
    (PEFT initializes B to zero). ValueError when no module matches."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=target_pattern(tuple(targets), vision=vision), bias="none")
    try:
        wrapper = get_peft_model(model, config)
    except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
        raise ValueError(f"LoRA found no module to adapt in {type(model).__name__} "
                         f"(targets {', '.join(targets)}{', vision blocks' if vision else ''}): {exc}") from None
    if wrapper.base_model.model is not model:  # we rely on the injection being in place (module docstring)
        raise RuntimeError("peft.get_peft_model did not adapt the model in place")
    compute_in_base_dtype(model)
    return wrapper


def compute_in_base_dtype(model: torch.nn.Module) -> int:
    """Over a bf16 / fp16 base, PEFT keeps the adapters in fp32 (AdamW needs fp32 weights: a bf16
    weight loses updates below 1/256 of itself) and casts each adapted layer's input to fp32 before
    the adapter: a copy of every adapted projection's input ([tokens, in] fp32; q, k and v each
    their own) that autograd keeps for the backward, 0.13 GiB a layer per 1,300 tokens at
    Qwen2.5-VL-3B's widths. Here the cast goes the other way, on the small weights: the adapter
    branch runs under autocast in the base's dtype (fp32 master weights, fp32 gradients, the input
    kept as it is, the same tensor the base layer saved). -> how many layers were switched.
    Layers whose base is fp32 are left alone (nothing to save, and fp32 stays fp32)."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for m in model.modules():
        if not isinstance(m, LoraLayer) or getattr(m, "_pebr_base_dtype", None) is not None:
            continue
        base = m.get_base_layer().weight.dtype
        if base not in (torch.bfloat16, torch.float16):
            continue
        m.cast_input_dtype_enabled = False  # PEFT's own switch (peft.helpers.disable_input_dtype_casting)
        m._pebr_base_dtype = base
        m.register_forward_pre_hook(_enter_base_dtype)
        m.register_forward_hook(_leave_base_dtype, always_call=True)
        switched += 1
    return switched


def _enter_base_dtype(module, args) -> None:
    x = args[0] if args else None
    device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    ctx = torch.autocast(device_type=device, dtype=module._pebr_base_dtype)
    ctx.__enter__()
    module.__dict__.setdefault("_pebr_autocast", []).append(ctx)


def _leave_base_dtype(module, args, output) -> None:
    stack = module.__dict__.get("_pebr_autocast")
    if stack:
        stack.pop().__exit__(None, None, None)


def has_lora(model: torch.nn.Module) -> bool:
    """Whether `model` holds PEFT adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_scaling(model: torch.nn.Module) -> float:
    """alpha / rank of the model's adapters (one value: add_lora gives every layer the same)."""
    from peft.tuners.lora import LoraLayer

    values = {float(s) for m in model.modules() if isinstance(m, LoraLayer) for s in m.scaling.values()}
    if len(values) != 1:
        raise ValueError(f"expected one LoRA scaling for the whole model, found {sorted(values) or 'none'}")
    return values.pop()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Inside: every LoRA layer computes its base layer alone (the frozen starting policy, bit for
    bit: the base layer's own forward, nothing added). The adapters come back after, trainable."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a full state dict of the adapted model (names as `model.state_dict()`)."""
    return {k: v for k, v in state_dict.items() if ".lora_" in k}


def merged_state_dict(state_dict: dict[str, torch.Tensor], *, scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict of the adapted model -> the plain model's: each adapted layer's weight
    W + scaling * B @ A (computed in fp32, stored in W's dtype) under its own name, the adapters dropped.
    Works on what FSDP gathers as well as on `model.state_dict()`."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            a = state_dict[f"{prefix}.lora_A.default.weight"].float()
            b = state_dict[f"{prefix}.lora_B.default.weight"].float()
            out[f"{prefix}.weight"] = (value.float() + scaling * (b @ a)).to(value.dtype)
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    return out


def save_adapter(wrapper, folder: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None,
                 base: str | None = None) -> None:
    """The adapter in PEFT's format into `folder` (adapter_config.json, adapter_model.safetensors):
    `PeftModel.from_pretrained(base_model, folder)` loads it. state_dict: the adapted model's full
    (or adapter-only) state dict, as gathered from FSDP shards; default the model's own. base: the
    folder of the base model, recorded as `base_model_name_or_path`."""
    if state_dict is None:
        state_dict = wrapper.base_model.model.state_dict()
    peft_sd = {PEFT_PREFIX + k: v.detach().cpu() for k, v in adapter_state(state_dict).items()}
    config = wrapper.peft_config["default"]
    config.base_model_name_or_path = base
    wrapper.save_pretrained(os.fspath(folder), state_dict=peft_sd, safe_serialization=True)


def load_adapter_weights(wrapper, folder: str | os.PathLike) -> None:
    """The adapter saved in `folder` (save_adapter) into the adapted model's LoRA layers.
    ValueError when its tensors do not match the layers' (another rank, targets or model)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = os.path.join(os.fspath(folder), "adapter_model.safetensors")
    weights = load_file(file)
    expected = {k for k in wrapper.state_dict() if ".lora_" in k}
    try:
        result = set_peft_model_state_dict(wrapper, weights)
    except RuntimeError as exc:  # a size mismatch: another rank or model
        raise ValueError(f"{file}: does not fit this model's adapters ({' '.join(str(exc).split())[:300]})") from None
    missing = [k for k in result.missing_keys if k in expected]
    if missing or result.unexpected_keys:
        raise ValueError(f"{file}: does not fit this model's adapters (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")
