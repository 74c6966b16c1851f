"""
Where a Split update's time goes on a CPU, and whether a causal attention kernel would save any of it.

    python results/scripts/update_profile.py            # ~2 minutes on 2 cores; run it on an idle machine

1. Plays one Split game with the embedded model (2 conversations of ~1,030 tokens, the first ~170 shared),
   then times one forward+backward of model.token_logprobs over them, as train.update runs it, in fp32 and
   under bf16 autocast, and prints the operators that took the most time (torch.profiler).
2. Times scaled_dot_product_attention forward+backward at that shape (9 query heads, 3 KV heads, head size
   64) with the boolean mask the update uses, with torch's lower-right causal bias (the same attention, not a
   materialized mask), with the same mask on the math backend (plain matmuls), and as square causal attention
   (is_causal=True over all ~1,030 positions, whose upper half a kernel can skip); checks that the first two
   agree exactly.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train  # noqa: E402
from load import load_model  # noqa: E402
from rollout import LMPolicy, rollout  # noqa: E402


def median_time(f, n=3):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]


def update_profile():
    model, tok = load_model("smollm2-135m", "cpu", torch.float32)
    ro = rollout("split", [LMPolicy(model, tok)], torch.zeros(1, 2, dtype=torch.long), 1, seed=0)
    L = int(ro.length.max())
    sel = ro.decision[:, :L]
    P = train.shared_prefix(ro.ids[:, :L], sel)
    ids, allowed = ro.ids[:, :L], ro.allowed[:, :L][sel]
    print(f"one Split game: 2 rows of {L} tokens, {P} shared, {int(sel.sum())} decision tokens")
    model.train()
    for name, ac in (("fp32", torch.autocast("cpu", enabled=False)),
                     ("bf16 autocast", torch.autocast("cpu", dtype=torch.bfloat16))):
        def step():
            with ac:
                logp, _ = model.token_logprobs(ids, sel, allowed, P)
            (-logp.sum()).backward()
        step()                                                      # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            step()
            t = time.perf_counter() - t
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows)
        attn = sum(e.self_cpu_time_total for e in rows if "scaled_dot_product" in e.key)
        print(f"\n{name}: forward+backward {t:.2f} s; attention {100 * attn / total:.0f}% of the operator time")
        for e in rows[:6]:
            print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.key[:70]}")


def math_backend(q, k, v, mask, g):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), (q, k, v), g)


def attention_variants(B=2, H=9, KV=3, T=860, P=174, hd=64):
    print(f"\nattention forward+backward per layer, {B} rows, {T} queries over {P} + {T} keys (median of 3):")
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(B, H, T, hd, dtype=dt, requires_grad=True)
        k = torch.randn(B, KV, P + T, hd, dtype=dt, requires_grad=True)
        v = torch.randn(B, KV, P + T, hd, dtype=dt, requires_grad=True)
        qs = torch.randn(B, H, P + T, hd, dtype=dt, requires_grad=True)
        mask = torch.ones(T, P + T, dtype=torch.bool).tril(P)[None, None].expand(B, 1, T, P + T)
        g, gs = torch.randn(B, H, T, hd, dtype=dt), torch.randn(B, H, P + T, hd, dtype=dt)
        run = {
            "bool mask (train.update today)": lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), (q, k, v), g),
            "causal_lower_right bias": lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, P + T), enable_gqa=True),
                (q, k, v), g),
            "bool mask, the math backend": lambda: math_backend(q, k, v, mask, g),
            f"is_causal, all {P + T} queries": lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True), (qs, k, v), gs),
        }
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, P + T), enable_gqa=True)
        print(f"  {str(dt)[6:]}: mask vs lower-right bias, max difference {(a - b).abs().max().item():.1e}")
        for name, f in run.items():
            f()
            print(f"    {name:34s} {1000 * median_time(f):7.1f} ms")


if __name__ == "__main__":
    torch.manual_seed(0)
    update_profile()
    attention_variants()
