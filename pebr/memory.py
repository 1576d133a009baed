"""Per-GPU memory of the model states under FSDP2, computed from parameter counts (not measured).

    python -m pebr.memory            # the README's table: Qwen2.5-VL-3B and -7B, 8 GPUs

Parameter counts come from building each model on the meta device from its published
architecture (hidden sizes, depths, vocabulary), so no weights are downloaded or allocated.
What is counted, per GPU, with W GPUs and P parameters (fp32 master weights, bf16 compute):
- policy shards: fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 P / W bytes;
- reference shards: fp32 weights = 4 P / W (no gradients, no optimizer);
- rollout: the whole policy gathered in bf16 for generation = 2 P (pebr.run.fsdp.gathered);
- with --cpu-offload the shards live in CPU memory: only the gathered copy stays on the GPU.
Activations are given apart, per 1,000 tokens of a micro-batch, with the usual estimate of a
transformer layer's saved activations in bf16 (about 34 H bytes per token per layer, Korthikanti
et al. 2022, attention by a fused kernel so no s^2 term), and 2 H bytes (the layer's input) with
--gradient-checkpointing plus one layer recomputed at a time. The KV cache of the rollout and the
LM-head logits chunk come on top.

With LoRA (`--lora-rank R`, one GPU, no sharding): the base frozen in bf16 = 2 P bytes; the Q
adapter parameters (rank R on every decoder projection: R x (in + out) each) in fp32 with their
gradients and AdamW's moments = 16 Q; no reference (it is the base with the adapters off) and no
gathered copy (the rollout runs on the same bf16 base). Activations as above (the adapters' own
R-wide activations are negligible beside them).
"""
from __future__ import annotations

import argparse

from pebr.model.sizes import REAL_SIZES

# the table's rows: its names for pebr.model.sizes' published architectures
ARCHS = {"Qwen2.5-VL-3B": "qwen2.5-vl-3b", "Qwen2.5-VL-7B": "qwen2.5-vl-7b"}


def parameter_count(name: str) -> int:
    """Parameters of architecture `name`, counted on the meta device."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pebr.model.sizes import real_config

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(real_config(ARCHS[name]))
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once


def lora_parameter_count(name: str, rank: int) -> int:
    """Adapter parameters of LoRA rank `rank` on architecture `name`'s decoder projections (the
    default targets, pebr.model.lora): rank x (in + out) for each adapted nn.Linear, on the meta device."""
    import re

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pebr.model.lora import target_pattern
    from pebr.model.sizes import real_config

    pattern = re.compile(target_pattern())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(real_config(ARCHS[name]))
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n))


def lora_gib(params: int, adapter_params: int) -> dict[str, float]:
    """GiB on one GPU of LoRA's parts, and the total (see the module docstring)."""
    gib = 2**30
    parts = {"base (bf16, frozen)": 2 * params / gib, "adapters (fp32 w, g, AdamW)": 16 * adapter_params / gib,
             "reference": 0.0}
    parts["total"] = sum(parts.values())
    return parts


def per_gpu_gib(params: int, world: int, *, offload: bool) -> dict[str, float]:
    """GiB per GPU of each part, and the total (see the module docstring for what is counted)."""
    gib = 2**30
    parts = {
        "policy shards": 0.0 if offload else 16 * params / world / gib,
        "reference shards": 0.0 if offload else 4 * params / world / gib,
        "rollout (gathered bf16)": 2 * params / gib,
    }
    parts["total"] = sum(parts.values())
    return parts


def activations_gib_per_1k_tokens(name: str, *, checkpointing: bool) -> float:
    """Saved activations of the language model per 1,000 tokens (see the module docstring)."""
    t = REAL_SIZES[ARCHS[name]]
    H, layers = t.hidden_size, t.num_hidden_layers
    per_token = (2 * H * layers + 34 * H) if checkpointing else 34 * H * layers
    return 1000 * per_token / 2**30


def table(world: int = 8) -> str:
    rows = ["| model | parameters | GPUs | offload | policy shards | reference | gathered for rollout | states total | "
            "activations / 1k tokens (no ckpt / ckpt) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ARCHS:
        P = parameter_count(name)
        act = [activations_gib_per_1k_tokens(name, checkpointing=c) for c in (False, True)]
        for offload in (False, True):
            g = per_gpu_gib(P, world, offload=offload)
            rows.append(f"| {name} | {P / 1e9:.2f} B | {world} | {'yes' if offload else 'no'} | {g['policy shards']:.1f} | "
                        f"{g['reference shards']:.1f} | {g['rollout (gathered bf16)']:.1f} | {g['total']:.1f} | "
                        f"{act[0]:.2f} / {act[1]:.2f} |")
    return "GiB per GPU, computed from parameter counts (not measured):\n\n" + "\n".join(rows)


def lora_table(ranks=(16, 64)) -> str:
    rows = ["| model | LoRA rank | adapter parameters | GPUs | base (bf16, frozen) | adapters (fp32 w, g, AdamW) | "
            "reference | states total | activations / 1k tokens (no ckpt / ckpt) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ARCHS:
        P = parameter_count(name)
        act = [activations_gib_per_1k_tokens(name, checkpointing=c) for c in (False, True)]
        for rank in ranks:
            Q = lora_parameter_count(name, rank)
            g = lora_gib(P, Q)
            rows.append(f"| {name} | {rank} | {Q / 1e6:.1f} M | 1 | {g['base (bf16, frozen)']:.1f} | "
                        f"{g['adapters (fp32 w, g, AdamW)']:.2f} | 0 (adapters off) | {g['total']:.1f} | "
                        f"{act[0]:.2f} / {act[1]:.2f} |")
    return "LoRA on one GPU, GiB, computed from parameter counts (not measured):\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pebr.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="GPUs the states are sharded over (default: 8, the paper's)")
    p.add_argument("--lora-rank", type=int, nargs="+", default=[16, 64],
                   help="LoRA ranks of the one-GPU LoRA table (default: 16 64)")
    args = p.parse_args(argv)
    print(table(args.gpus))
    print()
    print(lora_table(tuple(args.lora_rank)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
