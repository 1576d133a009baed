"""The LM head + per-token log-probs + token-mean GRPO loss, forward and backward, against Liger-Kernel.

Three implementations of the same work, at Qwen2.5-VL-3B's and -7B's LM heads (H = 2048 / 3584,
V = 151936 / 152064), hidden [N, H] and weight [V, H] both trained (requires_grad):
  ours   engine.ops.linear_token_logprobs -> engine.ops.grpo_loss -> backward
  liger  liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (the optional comparison: pip install
         liger-kernel; it is not in requirements.txt)
  torch  logits = hidden @ weight.T, log_softmax, gather, engine.reference.grpo_loss -> backward
The loss is the same for all three: token-mean over all tokens (Liger's "bnpo"), clip 0.2 / 0.3, no
dual clip (Liger has none), k3 KL to ref_logp with coefficient 0.04 (the paper preset), old_logp given.

Each (head, dtype, implementation) runs in a fresh subprocess; ours and Liger's back to back, in
alternating order, since other work on the machine moves timings between runs (compare times
within one run of this script only; memory figures do not move). Per row: the median wall time of
`--repeats` runs after one warm-up, the peak resident memory above the inputs (VmHWM, i.e. what
getrusage's ru_maxrss reports, reset through /proc/self/clear_refs before each run, minus VmRSS
once the inputs are allocated; the largest over the timed runs), the matmul FLOPs the work needs
(ours and Liger's: four [N, H] x [H, V] matmuls, 2·N·H·V each: logits, their recompute in backward,
dhidden, dweight; plain torch keeps the logits: three) and the GFLOP/s that gives, and the ratio
to Liger's time and memory. A check per (head, dtype), in its own subprocess (`--check-tokens`
rows, old_logp within 0.15 of the log-probs so that no token sits on a clip boundary), compares
ours and plain torch against Liger: loss, dhidden, dweight (on the rows of the ids and every 37th).

Run: python -m bench.head_vs_liger                   (3B and 7B, bf16 at B=2 T=1024, fp32 at B=1 T=512)
     python -m bench.head_vs_liger --heads 3b --dtypes bf16 --tokens 512 --repeats 1
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

HEADS = {"3b": (2048, 151936), "7b": (3584, 152064)}  # Qwen2.5-VL-{3B,7B}: (hidden size, vocabulary)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOSS = dict(clip_low=0.2, clip_high=0.3, kl_coef=0.04)
IMPLS = ("ours", "liger", "torch")
# max |got - want| / max |want| against Liger's result: bf16 logits round to 8 bits in all three
TOL = {"bf16": {"loss": 2e-3, "grad": 3e-2}, "fp32": {"loss": 1e-5, "grad": 1e-4}}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return "unknown"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def make_inputs(head: str, dtype: torch.dtype, batch: int, seq: int, seed: int = 0) -> dict:
    H, V = HEADS[head]
    g = torch.Generator().manual_seed(seed)
    base = -torch.log(torch.tensor(float(V)))  # about where a random head's log-probs sit
    return dict(
        hidden=torch.randn(batch, seq, H, generator=g).to(dtype).requires_grad_(),
        weight=(torch.randn(V, H, generator=g) * 0.02).to(dtype).requires_grad_(),
        ids=torch.randint(0, V, (batch, seq), generator=g),
        mask=torch.ones(batch, seq, dtype=torch.bool),
        adv=torch.randn(batch, generator=g),
        old=base + 0.2 * torch.randn(batch, seq, generator=g),
        ref=base + 0.2 * torch.randn(batch, seq, generator=g),
    )


def step_fn(impl: str, x: dict):
    """A function that runs forward and backward once and returns the loss (grads land in .grad)."""
    import engine.ops as ops
    from engine import reference

    hidden, weight, ids, mask, adv, old, ref = (x[k] for k in ("hidden", "weight", "ids", "mask", "adv", "old", "ref"))
    if impl == "ours":
        def run():
            logp = ops.linear_token_logprobs(hidden, weight, ids)
            loss, _ = ops.grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, dual_clip=None, **LOSS)
            loss.backward()
            return loss.detach()
    elif impl == "torch":
        def run():
            logits = torch.nn.functional.linear(hidden, weight).float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            loss, _ = reference.grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, dual_clip=None, **LOSS)
            loss.backward()
            return loss.detach()
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=LOSS["kl_coef"], epsilon_low=LOSS["clip_low"], epsilon_high=LOSS["clip_high"],
                                      loss_type="bnpo", use_ref_model=True)
        fmask = mask.float()

        def run():
            loss, _metrics = fn(hidden, weight, ids, fmask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss.backward()
            return loss.detach()
    else:
        raise ValueError(impl)
    return run


def measure(impl: str, head: str, dtype: str, batch: int, seq: int, repeats: int) -> dict:
    """One implementation in this (fresh) process: one warm-up, then `repeats` timed runs."""
    x = make_inputs(head, DTYPES[dtype], batch, seq)
    run = step_fn(impl, x)
    gc.collect()
    base = _status_bytes("VmRSS")  # the inputs (and the imports) are resident now
    times, peaks = [], []
    for i in range(repeats + 1):
        x["hidden"].grad = x["weight"].grad = None
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        peak = _status_bytes("VmHWM") - base
        if i > 0:  # the first run is the warm-up (Liger compiles its loss there)
            times.append(dt)
            peaks.append(peak)
        else:
            warm = (dt, peak)
    H, V = HEADS[head]
    n = batch * seq
    flops = (3 if impl == "torch" else 4) * 2 * n * H * V
    t = statistics.median(times)
    return dict(impl=impl, head=head, dtype=dtype, B=batch, T=seq, H=H, V=V, time_s=t, times_s=times,
                peak_MB=max(peaks) / 1e6, warmup_s=warm[0], warmup_peak_MB=warm[1] / 1e6, flops=flops,
                gflops=flops / t / 1e9, threads=torch.get_num_threads())


def check(head: str, dtype: str, batch: int, seq: int) -> dict:
    """Ours and plain torch against Liger on the same inputs: loss, dhidden, dweight."""
    x = make_inputs(head, DTYPES[dtype], batch, seq, seed=1)
    # old_logp within 0.15 of the log-probs: every ratio inside the clip range, so no token sits on a
    # clip boundary, where a rounding-sized difference in logp switches its gradient on or off
    with torch.no_grad():
        logits = torch.nn.functional.linear(x["hidden"], x["weight"]).float()
        logp = torch.log_softmax(logits, -1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
        del logits
    g = torch.Generator().manual_seed(2)
    x["old"] = logp + (0.05 * torch.randn(logp.shape, generator=g)).clamp(-0.15, 0.15)
    x["ref"] = logp + 0.2 * torch.randn(logp.shape, generator=g)
    # dweight kept on the rows of the ids (the one-hot terms) and every 37th row: three full [V, H]
    # gradients of the 7B head in fp32 would take 6.5 GB
    V = x["weight"].shape[0]
    rows = torch.unique(torch.cat([x["ids"].flatten(), torch.arange(0, V, 37)]))
    got = {}
    for impl in IMPLS:
        x["hidden"].grad = x["weight"].grad = None
        loss = step_fn(impl, x)()
        got[impl] = (loss, x["hidden"].grad, x["weight"].grad[rows].clone())
    x["weight"].grad = None

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = dict(head=head, dtype=dtype, B=batch, T=seq, ok=True)
    tol = TOL[dtype]
    for impl in ("ours", "torch"):
        for name, i, kind in (("loss", 0, "loss"), ("dhidden", 1, "grad"), ("dweight", 2, "grad")):
            err = rel(got[impl][i], got["liger"][i])
            out[f"{impl}_{name}_rel"] = err
            out["ok"] &= err <= tol[kind]
    return out


def subprocess_json(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.head_vs_liger", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return dict(error=(p.stderr or p.stdout).strip().splitlines()[-1:], cmd=" ".join(args))
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="3b,7b", help="comma-separated: 3b, 7b")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: ours, liger, torch")
    ap.add_argument("--batch", type=int, default=None, help="sequences B (default 2 for bf16, 1 for fp32)")
    ap.add_argument("--tokens", type=int, default=None, help="N = B*T (default 2048 for bf16, 512 for fp32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median)")
    ap.add_argument("--check-tokens", type=int, default=256, help="rows of the numerical check (0: no check)")
    ap.add_argument("--json", help="append each result as a JSON line to this file")
    ap.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)  # internal: measure in this process
    ap.add_argument("--check-one", action="store_true", help=argparse.SUPPRESS)  # internal: check here
    a = ap.parse_args()

    if a.one or a.check_one:
        head, dtype = a.heads, a.dtypes
        seq = a.tokens // a.batch
        res = check(head, dtype, a.batch, seq) if a.check_one else measure(a.one, head, dtype, a.batch, seq, a.repeats)
        print(json.dumps(res))
        return

    print(f"CPU: {cpu_name()}; {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    impls = a.impls.split(",")
    order = [i for i in ("ours", "liger") if i in impls] + [i for i in impls if i not in ("ours", "liger")]
    hdr = f"{'head':4} {'dtype':5} {'B x T':>9} {'impl':6} {'time s':>8} {'peak MB':>8} {'TFLOP':>6} {'GFLOP/s':>8} {'t/liger':>8} {'mem/liger':>9}"
    print(hdr)
    flip = False
    for head in a.heads.split(","):
        for dtype in a.dtypes.split(","):
            batch = a.batch or (2 if dtype == "bf16" else 1)
            tokens = a.tokens or (2048 if dtype == "bf16" else 512)
            common = ["--heads", head, "--dtypes", dtype, "--batch", str(batch)]
            rows = {}
            seq_order = order[:2][::-1] + order[2:] if flip and len(order) >= 2 else order
            flip = not flip
            for impl in seq_order:
                rows[impl] = subprocess_json(common + ["--tokens", str(tokens), "--one", impl, "--repeats", str(a.repeats)])
            for impl in order:
                r, lg = rows[impl], rows.get("liger")
                if "error" in r:
                    print(f"{head:4} {dtype:5} {batch}x{tokens // batch:<7} {impl:6} error: {r['error']}")
                    continue
                def ratio(k, r=r, lg=lg):
                    return f"{r[k] / lg[k]:.2f}" if lg and "error" not in lg else "-"
                print(f"{head:4} {dtype:5} {batch:>3}x{r['T']:<5} {impl:6} {r['time_s']:8.2f} {r['peak_MB']:8.0f} "
                      f"{r['flops'] / 1e12:6.2f} {r['gflops']:8.1f} {ratio('time_s'):>8} {ratio('peak_MB'):>9}", flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(dict(r, order=seq_order)) + "\n")
            if a.check_tokens and "liger" in impls:
                cb = min(batch, a.check_tokens)
                c = subprocess_json(common[:4] + ["--batch", str(cb), "--tokens", str(a.check_tokens), "--check-one"])
                if "error" in c:
                    print(f"  check: error: {c['error']}")
                else:
                    errs = ", ".join(f"{k[:-4]} {v:.1e}" for k, v in c.items() if k.endswith("_rel"))
                    print(f"  check ({a.check_tokens} tokens, max|diff|/max|liger|): {'ok' if c['ok'] else 'FAILED'}: {errs}", flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(dict(c, kind="check")) + "\n")


if __name__ == "__main__":
    main()
