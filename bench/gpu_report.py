"""Writes the short GPU report (markdown) from a bench/gpu.sh output folder.

Usage: python bench/gpu_report.py OUT_DIR > OUT_DIR/REPORT.md
Rows: every benchmark with its median, ratio to the torch reference of the same group, and
throughput against the floors measured in the same run (copy bandwidth, bf16 matmul rate).
"""
import json
import os
import re
import sys


def main(out_dir: str) -> None:
    env = open(os.path.join(out_dir, "env.txt")).read().strip().splitlines()
    print("# GPU report\n")
    print("```\n" + "\n".join(env) + "\n```\n")
    tests_log = os.path.join(out_dir, "tests.log")
    if os.path.exists(tests_log):
        lines = [l for l in open(tests_log).read().splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
        print(f"Tests on CUDA tensors: {lines[-1] if lines else 'no summary line (see tests.log)'}\n")
    path = os.path.join(out_dir, "bench.json")
    if not os.path.exists(path):
        print("No bench.json: the benchmarks did not finish (see bench.log).")
        return
    data = json.load(open(path))
    floors = data["floors"]
    print("Floors measured in this run: " + ", ".join(f"{k} = {v:.1f}" for k, v in floors.items()) + "\n")
    print("| group | backend | median ms | x vs torch | GB/s | % copy BW | TFLOP/s | peak extra MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["results"]:
        gbps = r.get("GBps")
        print(
            f"| {r['group']} | {r['backend']} | {r['median_ms']:.4f} | {r.get('speedup_vs_torch', float('nan')):.2f} "
            f"| {gbps or float('nan'):.0f} | {100 * (gbps or 0) / floors['copy_GBps']:.0f} "
            f"| {r.get('TFLOPs', float('nan')):.1f} | {r.get('peak_extra_MB', float('nan')):.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
