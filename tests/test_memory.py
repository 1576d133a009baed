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
