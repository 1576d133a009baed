"""pebr.memory: the README's per-GPU table is arithmetic on exact parameter counts."""
from pebr import memory


def test_parameter_counts_match_the_published_sizes():
    # Qwen2.5-VL-3B-Instruct and -7B-Instruct are published as 3.75 B and 8.29 B parameters.
    assert round(memory.parameter_count("Qwen2.5-VL-3B") / 1e9, 2) == 3.75
    assert round(memory.parameter_count("Qwen2.5-VL-7B") / 1e9, 2) == 8.29


def test_per_gpu_arithmetic():
    P = 8 * 2**30  # 8 Gi parameters on 8 GPUs: 1 Gi each
    g = memory.per_gpu_gib(P, 8, offload=False)
    assert g == {"policy shards": 16.0, "reference shards": 4.0, "rollout (gathered bf16)": 16.0, "total": 36.0}
    assert memory.per_gpu_gib(P, 8, offload=True)["total"] == 16.0
    assert "Qwen2.5-VL-7B" in memory.table(8)


def test_lora_counts_and_arithmetic():
    # Qwen2.5-VL-7B's decoder: 28 layers, H 3,584, MLP 18,944, 4 KV heads of 128. Rank 16 on q, k, v,
    # o, gate, up, down: 16 x ((H+H) + 2 (H+512) + (H+H) + 3 (H+18,944)) per layer, worked by hand.
    per_layer = 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert per_layer == 1_441_792
    assert memory.lora_parameter_count("Qwen2.5-VL-7B", 16) == 28 * per_layer
    assert memory.lora_parameter_count("Qwen2.5-VL-7B", 64) == 4 * 28 * per_layer
    g = memory.lora_gib(2**30, 2**26)  # 1 Gi parameters in bf16, 64 Mi adapter parameters
    assert g == {"base (bf16, frozen)": 2.0, "adapters (fp32 w, g, AdamW)": 1.0, "reference": 0.0, "total": 3.0}
    assert "| Qwen2.5-VL-3B | 16 |" in memory.lora_table((16,))
