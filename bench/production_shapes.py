"""Correctness at the shapes training runs at, on every fast backend of the device.

Each check runs the op once (forward, and backward where training needs it) at a production shape
and compares a sample of rows (or, where cheap, everything) against fp64 or the reference:
  token_logprobs         N=8192 V=151936 bf16, logp + entropy, fwd+bwd, sampled rows against fp64
  linear_token_logprobs  N=8192 H=4096 V=151936 bf16, logp + entropy, fwd+bwd: logp/entropy of all
                         rows and dhidden of sampled rows against fp64, dweight on sampled vocab rows
  token_logprobs (N*V > 2^31)  N=16384 V=151936 bf16: rows past the 2^31st element are sampled
  grpo_loss              B=2048 T=4096 fp32 against the reference (it computes in fp32 itself)
  patchify_embed         8 images of 896x896 (32768 patches) bf16, sampled patches against fp64

`--scale small` runs the same code at small shapes (the CPU rehearsal of bench/gpu.sh): the logic is
exercised on every machine, only the sizes differ. Each result is one JSON line appended to `--out`
as soon as it is known (a run cut short by a time limit keeps what it finished), and one printed line.
A check that raises (out of memory, a kernel error) is recorded as an error; the others still run.

Run: python -m bench.production_shapes --device cuda --out OUT/shapes.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch

import engine
import engine.ops as ops
from engine import reference


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one run of the checks."""

    tl: tuple[int, int]  # token_logprobs (N, V)
    ltl: tuple[int, int, int]  # linear_token_logprobs (N, H, V)
    big: tuple[int, int]  # token_logprobs (N, V) with N*V > 2^31 at full scale
    grpo: tuple[int, int]  # grpo_loss (B, T)
    images: tuple[int, int, int]  # patchify_embed (images, height, width); height, width multiples of 28
    sample_rows: int  # rows (patches, vocab rows) compared against fp64


FULL = Shapes(tl=(8192, 151936), ltl=(8192, 4096, 151936), big=(16384, 151936), grpo=(2048, 4096),
              images=(8, 896, 896), sample_rows=64)
# Odd vocabularies, so no block size divides them; the same code paths at CPU-friendly sizes.
SMALL = Shapes(tl=(64, 1531), ltl=(48, 64, 1531), big=(96, 1531), grpo=(16, 256), images=(2, 56, 84), sample_rows=8)

# max |a - b| / max |b|: bf16 inputs with fp32 accumulation stay far below these; a wrong row, a
# wrong index past 2^31 or a dropped chunk gives O(1).
TOL = {"logp": 2e-3, "entropy": 2e-3, "grad": 2e-2, "embed": 1e-2, "loss": 1e-5}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale) if want.numel() else 0.0


def sample_rows(n: int, k: int, device, *, gen: torch.Generator, include=()) -> torch.Tensor:
    """k row indices in [0, n): the first, the last, `include`, and random ones (sorted, distinct)."""
    rows = {0, n - 1, *[i for i in include if 0 <= i < n]}
    rows.update(torch.randint(0, n, (k,), generator=gen).tolist())
    return torch.tensor(sorted(rows), device=device)


def _fp64_stats(z: torch.Tensor, ids: torch.Tensor):
    """z: [n, V] fp64, ids: [n] -> (logp, entropy, p, lse) in fp64."""
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    logp = z.gather(-1, ids[:, None]).squeeze(-1) - lse
    entropy = lse - (p * z).sum(-1)
    return logp, entropy, p, lse


def _fp64_dz(z, ids, g_logp, g_ent):
    """The gradient of sum(g_logp*logp + g_ent*entropy) in z, fp64 (DESIGN of token_logprobs)."""
    logp, entropy, p, lse = _fp64_stats(z, ids)
    onehot = torch.zeros_like(z).scatter_(-1, ids[:, None], 1.0)
    return g_logp[:, None] * (onehot - p) + g_ent[:, None] * p * (lse - entropy)[:, None] - g_ent[:, None] * p * z


def check_token_logprobs(N, V, dtype, device, backend, shapes, gen):
    logits = (torch.randn(N, V, generator=gen, device=device) * 2).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=gen, device=device)
    g_logp, g_ent = torch.randn(N, generator=gen, device=device), torch.randn(N, generator=gen, device=device)
    with engine.backend(backend):
        logp, entropy = ops.token_logprobs(logits, ids, return_entropy=True)
        (logp * g_logp + entropy * g_ent).sum().backward()
    past = [(2**31 + V - 1) // V, N - 2]  # first row whose start lies past element 2^31 (when N*V > 2^31)
    rows = sample_rows(N, shapes.sample_rows, device, gen=gen_cpu(gen), include=past)
    z = logits.detach()[rows].double()
    want_logp, want_ent, _, _ = _fp64_stats(z, ids[rows])
    dz = _fp64_dz(z, ids[rows], g_logp[rows].double(), g_ent[rows].double())
    return {"logp": rel_err(logp[rows], want_logp), "entropy": rel_err(entropy[rows], want_ent),
            "grad": rel_err(logits.grad[rows], dz)}, f"{len(rows)} rows (of {N}) against fp64"


def check_linear_token_logprobs(N, H, V, dtype, device, backend, shapes, gen):
    hidden = torch.randn(N, H, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen, device=device) / H**0.5).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=gen, device=device)
    g_logp, g_ent = torch.randn(N, generator=gen, device=device), torch.randn(N, generator=gen, device=device)
    with engine.backend(backend):
        logp, entropy = ops.linear_token_logprobs(hidden, weight, ids, return_entropy=True)
        (logp * g_logp + entropy * g_ent).sum().backward()
    h64, w64 = hidden.detach().double(), weight.detach().double()
    # every row's logp and entropy in fp64, a chunk of rows at a time (never [N, V] fp64 at once)
    chunk = max(1, min(N, 2**28 // (8 * V)))
    want_logp, want_ent, lse = (torch.empty(N, dtype=torch.float64, device=device) for _ in range(3))
    for s in range(0, N, chunk):
        lp, ent, _, ls = _fp64_stats(h64[s:s + chunk] @ w64.T, ids[s:s + chunk])
        want_logp[s:s + chunk], want_ent[s:s + chunk], lse[s:s + chunk] = lp, ent, ls
    rows = sample_rows(N, shapes.sample_rows, device, gen=gen_cpu(gen))
    dz_rows = _fp64_dz(h64[rows] @ w64.T, ids[rows], g_logp[rows].double(), g_ent[rows].double())
    # dweight on sampled vocabulary rows: dW[v] = sum_n dz[n, v] hidden[n], with dz[:, v] from the
    # full-row statistics above (p = exp(z - lse), entropy), so no [N, V] tensor is needed
    vrows = sample_rows(V, shapes.sample_rows, device, gen=gen_cpu(gen), include=[V // 2])
    zv = h64 @ w64[vrows].T  # [N, k]
    pv = torch.exp(zv - lse[:, None])
    onehot = (ids[:, None] == vrows[None, :]).double()
    dzv = g_logp.double()[:, None] * (onehot - pv) + g_ent.double()[:, None] * pv * ((lse - want_ent)[:, None] - zv)
    dw = dzv.T @ h64
    errs = {"logp": rel_err(logp, want_logp), "entropy": rel_err(entropy, want_ent),
            "grad": max(rel_err(hidden.grad[rows], dz_rows @ w64), rel_err(weight.grad[vrows], dw))}
    return errs, f"logp/entropy of all {N} rows, dhidden of {len(rows)} rows, dweight of {len(vrows)} vocab rows, against fp64"


def check_grpo_loss(B, T, device, backend, shapes, gen):
    kw = dict(generator=gen, device=device)
    logp = torch.randn(B, T, **kw) * 0.5 - 2
    old, ref = logp + 0.1 * torch.randn(B, T, **kw), logp + 0.1 * torch.randn(B, T, **kw)
    adv, mask = torch.randn(B, **kw), torch.rand(B, T, **kw) > 0.2
    opts = dict(old_logp=old, ref_logp=ref, kl_coef=0.01)
    results = []
    for impl in (lambda *a, **k: _forced(backend, ops.grpo_loss, *a, **k), reference.grpo_loss):
        x = logp.clone().requires_grad_()
        loss, metrics = impl(x, adv, mask, **opts)
        loss.backward()
        results.append((loss.detach(), torch.stack([metrics[k] for k in sorted(metrics)]), x.grad))
    (loss, met, grad), (rloss, rmet, rgrad) = results
    return {"loss": max(rel_err(loss, rloss), rel_err(met, rmet)), "grad": rel_err(grad, rgrad)}, \
        f"loss, metrics and all of dlogp against the reference ({B * T} tokens)"


def check_patchify_embed(n_img, H, W, dtype, device, backend, shapes, gen):
    images = torch.randint(0, 256, (n_img, 3, H, W), dtype=torch.uint8, generator=gen, device=device)
    weight = (torch.randn(1280, 3, 2, 14, 14, generator=gen, device=device) * 0.02).to(dtype)
    embeds, grid = _forced(backend, ops.patchify_embed, images, weight)
    pixel_values, want_grid = reference.patchify(images)
    rows = sample_rows(pixel_values.shape[0], shapes.sample_rows, device, gen=gen_cpu(gen))
    # the model casts the fp32 patches to its dtype before the Conv3d: so does the fp64 truth
    want = pixel_values[rows].to(dtype).double() @ weight.reshape(1280, -1).double().T
    if not torch.equal(grid.cpu(), want_grid.cpu()):
        return {"embed": float("inf")}, "grid_thw differs from the reference"
    return {"embed": rel_err(embeds[rows], want)}, f"{len(rows)} patches (of {pixel_values.shape[0]}) against fp64"


def _forced(backend, fn, *args, **kwargs):
    with engine.backend(backend):
        return fn(*args, **kwargs)


def gen_cpu(gen: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from `gen` (index sampling draws on the host)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen, device=gen.device)))


def checks(shapes: Shapes):
    """(name, shape text, function(device, backend, gen) -> (errors, how)) for every check."""
    bf = torch.bfloat16
    (n1, v1), (n2, h2, v2), (n3, v3), (b, t), (ni, hi, wi) = shapes.tl, shapes.ltl, shapes.big, shapes.grpo, shapes.images
    return [
        ("token_logprobs fwd+bwd", f"N={n1} V={v1} bf16", lambda d, be, g: check_token_logprobs(n1, v1, bf, d, be, shapes, g)),
        ("linear_token_logprobs fwd+bwd", f"N={n2} H={h2} V={v2} bf16",
         lambda d, be, g: check_linear_token_logprobs(n2, h2, v2, bf, d, be, shapes, g)),
        ("token_logprobs fwd+bwd, N*V > 2^31 at full scale", f"N={n3} V={v3} bf16 (N*V = {n3 * v3:,})",
         lambda d, be, g: check_token_logprobs(n3, v3, bf, d, be, shapes, g)),
        ("grpo_loss fwd+bwd", f"B={b} T={t} fp32", lambda d, be, g: check_grpo_loss(b, t, d, be, shapes, g)),
        ("patchify_embed", f"{ni} images {hi}x{wi} bf16", lambda d, be, g: check_patchify_embed(ni, hi, wi, bf, d, be, shapes, g)),
    ]


def fast_backends(device: torch.device) -> list[str]:
    """The backends a user gets on `device` other than the reference (Triton's CPU interpreter is a
    correctness tool far too slow for these sizes); the reference alone where nothing else is built."""
    fast = [b for b in engine.available_backends(device.type) if b != "torch" and not (b == "triton" and device.type == "cpu")]
    return fast or ["torch"]


def run(device: torch.device, shapes: Shapes, out_path: str | None, only: str | None = None) -> int:
    """Runs every check on every fast backend; returns the number that failed or raised."""
    bad = 0
    for name, shape, fn in checks(shapes):
        if only and only not in name:
            continue
        for backend in fast_backends(device):
            gen = torch.Generator(device=device).manual_seed(0)
            t0 = time.perf_counter()
            row = dict(check=name, shape=shape, backend=backend, device=device.type)
            try:
                errs, how = fn(device, backend, gen)
                worst = {k: v for k, v in errs.items() if not v <= TOL[k]}
                row.update(status="pass" if not worst else "FAIL", errors=errs, tolerances={k: TOL[k] for k in errs}, how=how)
            except Exception as e:  # one check's crash (OOM, kernel error) must not hide the others' results
                row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
                traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - t0, 3)
            bad += row["status"] != "pass"
            errs_txt = ", ".join(f"{k} {v:.1e}" for k, v in row.get("errors", {}).items()) or row.get("error", "")
            print(f"{row['status']:5s} {name} [{shape}] backend={backend} {row['seconds']:.1f} s: {errs_txt}", flush=True)
            if out_path:
                with open(out_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=os.environ.get("ENGINE_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    ap.add_argument("--scale", choices=["full", "small"], default=None,
                    help="full: the production shapes (default on CUDA); small: the same checks at CPU sizes (default on CPU)")
    ap.add_argument("--out", default=None, help="append one JSON line per result here")
    ap.add_argument("--only", default=None, help="run the checks whose name contains this text")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    scale = args.scale or ("full" if device.type == "cuda" else "small")
    print(f"production shapes: scale={scale} device={device} backends={fast_backends(device)}", flush=True)
    return 1 if run(device, FULL if scale == "full" else SMALL, args.out, args.only) else 0


if __name__ == "__main__":
    sys.exit(main())
