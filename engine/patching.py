"""Plug the engine's kernels into a `transformers` Qwen2-VL / Qwen2.5-VL model.

    engine.patching.patch_model(model)          # vision patch embedding -> engine.ops.patch_embed
    logp = engine.patching.token_logprobs_from_model(model, input_ids=ids, attention_mask=mask,
                                                     pixel_values=pv, image_grid_thw=thw)  # [B, T-1] fp32

`patch_model` swaps only the `forward` of the patch-embedding module: its `proj.weight` stays the
same Parameter under the same name, so checkpoints load and save unchanged.
`token_logprobs_from_model` runs the base model (never the LM head), then the fused
`linear_token_logprobs` on its last hidden states: the [B, T, V] logits are never materialized.
"""
from __future__ import annotations

import types

import torch

import engine.ops

__all__ = ["patch_model", "unpatch_model", "token_logprobs_from_model", "find_patch_embeds", "mm_token_type_ids"]


# ---- log-probs of a sequence under a causal LM, through the fused LM-head op ----


def _base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model without its LM head, the LM head Linear) of a `*ForConditionalGeneration` / `*ForCausalLM`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"model must have a Linear LM head (lm_head), got {type(head).__name__}")
    base = getattr(model, "model", None)
    if base is None:
        base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"model ({type(model).__name__}) has no base model under .model")
    return base, head


def mm_token_type_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids: [B, T] -> [B, T] int32: 0 text, 1 image token, 2 video token (what the Qwen-VL processor returns)."""
    cfg = model.config
    out = torch.zeros_like(input_ids, dtype=torch.int32)
    for value, name in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(cfg, name, None)
        if token is not None:
            out[input_ids == token] = value
    return out


def token_logprobs_from_model(
    model: torch.nn.Module,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    **model_kwargs,
):
    """input_ids: [B, T] -> logp: [B, T-1] fp32 (and entropy: [B, T-1] fp32).

    logp[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1], image) at `temperature`, computed
    from the base model's last hidden states [B, T, H] and the LM head weight [V, H] by
    `engine.ops.linear_token_logprobs`. Positions under padding are computed too; mask them.
    With images and no `mm_token_type_ids` in model_kwargs, it is derived from the config's image/video
    token ids (M-RoPE needs it).
    Differentiable in every parameter of the model (and pixel_values).
    """
    from engine import _validate

    _validate.check_index("input_ids", input_ids, ndim=2)
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens per row, got shape {tuple(input_ids.shape)}")
    _validate.check_positive("temperature", temperature)
    base, head = _base_and_head(model)
    if pixel_values is not None:
        model_kwargs["pixel_values"] = pixel_values
    if image_grid_thw is not None:
        model_kwargs["image_grid_thw"] = image_grid_thw
        if model_kwargs.get("mm_token_type_ids") is None:
            # transformers 5 needs it for M-RoPE (without it, positions silently fall back to 1-D)
            model_kwargs["mm_token_type_ids"] = mm_token_type_ids(model, input_ids)
    model_kwargs.setdefault("use_cache", False)
    out = base(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return engine.ops.linear_token_logprobs(
        hidden[:, :-1],
        head.weight,
        input_ids[:, 1:],
        bias=head.bias,
        temperature=temperature,
        return_entropy=return_entropy,
    )


# ---- the vision tower's patch embedding -> engine.ops.patch_embed ----


def _is_patch_embed(module: torch.nn.Module) -> bool:
    # Qwen2-VL `PatchEmbed` and Qwen2.5-VL `Qwen2_5_VisionPatchEmbed`: a Conv3d `proj`, kernel == stride.
    proj = getattr(module, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d):
        return False
    return (
        tuple(proj.kernel_size) == tuple(proj.stride)
        and tuple(proj.padding) == (0, 0, 0)
        and tuple(proj.dilation) == (1, 1, 1)
        and proj.groups == 1
        and proj.kernel_size[1] == proj.kernel_size[2]
    )


def find_patch_embeds(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every Qwen-style patch embedding: `model.visual.patch_embed` (Qwen*VLModel)
    or `model.model.visual.patch_embed` (*ForConditionalGeneration), found by structure."""
    return [(n, m) for n, m in model.named_modules() if n.endswith("patch_embed") and _is_patch_embed(m)]


def _engine_patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """hidden_states: [N, C*Tp*P*P] (any float dtype) -> [N, D] in the weight's dtype, as the Conv3d does."""
    weight = self.proj.weight
    x = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
    return engine.ops.patch_embed(x, weight, self.proj.bias)


def patch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Route every Qwen-VL vision patch embedding of `model` through `engine.ops.patch_embed`, in place.

    Parameters, their names and state_dict stay the same. Returns `model`. Raises ValueError if
    the model has no such module (not a Qwen2-VL / Qwen2.5-VL model).
    """
    found = find_patch_embeds(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no Qwen-VL patch embedding (visual.patch_embed with a Conv3d proj)")
    for _, module in found:
        if getattr(module, "_engine_patched", False):
            continue
        module.forward = types.MethodType(_engine_patch_embed_forward, module)
        module._engine_patched = True
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch_model`: the modules' class forward is used again."""
    for _, module in find_patch_embeds(model):
        if getattr(module, "_engine_patched", False):
            del module.forward
            module._engine_patched = False
    return model
