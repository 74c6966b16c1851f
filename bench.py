"""
bench.py: how fast is one training iteration (rollout + update) on this device, against transformers' own
model on the same weights, the same inputs and the same device, measured in one run.

    python bench.py                                   # ipd, embedded SmolLM2-135M, 16 games, CPU: ~6 minutes
    python bench.py --n_games 8                       # quicker
    python bench.py --device cuda --n_games 128       # one GPU
    python bench.py --device cuda --model random:qwen2.5-1.5b --env tas --n_games 64 --max_msg_tokens 128 --baseline false

Ours: rollout.py (persistent KV cache, shared prompt prefix, constrained decoding) and train.update
(shared-prefix forward+backward, lm_head only at decision tokens, Adam step), in the dtype train.py picks
(--dtype auto: bf16 autocast on CUDA, fp32 on a CPU).
Baselines: (a) every round, transformers `generate` on each whole conversation so far (how a typical script
plays multi-turn games), replaying our exact conversations; (b) the same loss with transformers'
forward+backward plus the same Adam step.
Figures: seconds and tokens/s per phase; MFU = useful model FLOPs / seconds / the device's matmul peak in
that dtype, measured here; decode_step_ms = the rollout's decode calls (at most 8 new tokens per row) replayed
alone, per call (measured; the engine's own time is in engine_overhead); engine_overhead = rollout wall time / the time of the same model calls
(same batch, chunk and cache shapes) replayed alone; bandwidth_util = bytes a decode step must read (weights
+ the KV cache in use) / measured memory bandwidth / decode_step_ms. On CUDA every timer synchronizes.
The last line is one JSON object.
"""
import argparse
import json
import resource
import statistics
import time

import torch

import devices
import envs
import memory
import train
from load import load_model
from model import KVCache, cache_dtype, masked_log_softmax
from engine import GRAPH_STATS
from rollout import LMPolicy, rollout

# -----------------------------------------------------------------------------
# the device

def clock(dev):
    """A timer that waits for the device's queued work first."""
    def now():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()
    return now

def median_s(fn, now, reps):
    """Median seconds of fn() over reps timed calls, after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)

def matmul_peak(dev, dtype, reps=5):
    """Best FLOP/s of F.linear over a few shapes (median of reps each): the denominator of MFU."""
    now, best = clock(dev), 0.0
    shapes = (((4096, 4096, 4096), (8192, 2048, 8192)) if dev.type == "cuda" else
              ((1024, 1024, 1024), (512, 576, 1536), (2048, 576, 1536)))             # a square one, the MLP's
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=dev), torch.randn(n, k, dtype=dtype, device=dev)
        best = max(best, 2 * m * k * n / median_s(lambda: torch.nn.functional.linear(a, b), now, reps))
    return best

def bandwidth(dev, reps=5):
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = (1 << 30) if dev.type == "cuda" else (1 << 27)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * n / median_s(lambda: b.copy_(a), clock(dev), reps)

def fwd_flops(model, n_tokens, n_logits):
    """Forward FLOPs: 2 per weight per token (embedding lookup excluded) + the lm_head where it runs."""
    cfg = model.cfg
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return 2 * n_body * n_tokens + 2 * cfg.vocab_size * cfg.n_embd * n_logits

# -----------------------------------------------------------------------------
# our rollout, with every model call recorded, then replayed alone

def timed_rollout(model, env, pol, G, cfg, seed, autocast, now, cuda_graph=False):
    """Our rollout with model.extend wrapped to record each call's shape (no timer inside: on a GPU that
    would make the host wait for every call): -> (Rollout, wall s, calls [(B, T, cache slots used, cache
    size, lengths)]). Steps replayed from a CUDA graph call no Python: GRAPH_STATS counts them."""
    calls, inner = [], model.extend
    def extend(cache, idx, lengths, span=None):          # slots used before the chunk: with a fixed span, as many
        s0 = cache.span if span is None else span - idx.size(1)     # as make the replay read that span
        calls.append((idx.size(0), idx.size(1), s0, cache.k.size(3), lengths.clone()))
        return inner(cache, idx, lengths, span)
    model.extend = extend
    try:
        t0 = now()
        with autocast:
            ro = rollout(env, [pol], torch.zeros(G, 2, dtype=torch.long), G, seed=seed, group_size=cfg["group_size"],
                         n_rounds=cfg["n_rounds"], max_msg_tokens=cfg["max_msg_tokens"], cuda_graph=cuda_graph)
        wall = now() - t0
    finally:
        del model.extend
    return ro, wall, calls

@torch.no_grad()
def replay(model, calls, autocast, now, dev):
    """The same extend calls at the same shapes, with nothing around them: the model's share of the rollout.
    One cache per batch size, as large as the largest call needs, every row as long as the span (the mask's
    values do not change the work); inputs made beforehand; one timer around each loop, so that on a GPU the host runs
    ahead of the device as it does in the rollout. -> seconds of (prefill calls, decode calls: <= 8 new
    tokens per row)."""
    with autocast:
        caches = {B: KVCache(model.cfg, B, max(c[3] for c in calls if c[0] == B), dev, cache_dtype(model))
                  for B in {c[0] for c in calls}}
        inputs = [(T <= 8, caches[B], s0, torch.randint(model.cfg.vocab_size, (B, T), device=dev), lengths.to(dev))
                  for B, T, s0, _, lengths in calls]
        out = []
        for decode in (False, True):
            t0 = now()
            for is_decode, cache, s0, idx, lengths in inputs:
                if is_decode == decode:
                    cache.len.fill_(s0)
                    cache.span = s0
                    model.extend(cache, idx, lengths)
            out.append(now() - t0)
    return out

# -----------------------------------------------------------------------------
# transformers baselines

@torch.no_grad()
def hf_rollout_baseline(hf, ro, eot, dev, autocast, now):
    """Replay our conversations round by round with transformers generate on the whole history."""
    N = ro.ids.size(0)
    n_turns = int(ro.token_round.max()) + 1
    t0 = now()
    for t in range(n_turns):
        starts, news = [], []
        for i in range(N):
            sampled = (ro.action_mask[i] & (ro.token_round[i] == t)).nonzero().flatten()
            starts.append(int(sampled[0]))
            news.append(len(sampled))
        L = max(starts)
        idx = torch.zeros(N, L, dtype=torch.long)
        att = torch.zeros(N, L, dtype=torch.long)
        for i, s in enumerate(starts):               # left padding, as generate wants
            idx[i, L - s:] = ro.ids[i, :s]
            att[i, L - s:] = 1
        with autocast:
            hf.generate(input_ids=idx.to(dev), attention_mask=att.to(dev), max_new_tokens=max(news),
                        min_new_tokens=max(news), do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=eot)
    return now() - t0

def hf_update_baseline(hf, opt, ro, credit, trained, micro_tokens, dev, autocast, now):
    """The same token-level loss with transformers' forward+backward, plus the same Adam step."""
    tok_credit = train.token_credits(ro, credit)
    decision = ro.decision & trained[:, None]
    n_tok = int(decision.sum())
    t0 = now()
    opt.zero_grad(set_to_none=True)
    for mb in devices.micro_batches(trained.nonzero().flatten().tolist(), ro.length, micro_tokens):
        L = int(ro.length[mb].max())
        ids, mask = ro.ids[mb, :L].to(dev), decision[mb, :L].to(dev)
        att = (torch.arange(L)[None] < ro.length[mb][:, None]).long().to(dev)
        with autocast:
            h = hf.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1][mask[:, 1:]]
            logits = hf.lm_head(h).float()
        logp_all = masked_log_softmax(logits, ro.allowed[mb, :L][decision[mb, :L]].to(dev))
        logp = logp_all.gather(1, ids[mask][:, None]).squeeze(1)
        (-(tok_credit[mb, :L][decision[mb, :L]].to(dev) * logp).sum() / n_tok).backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    return now() - t0

def hf_twin(model, dev):
    """transformers' own model class with our weights (parameter names are the same)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = AutoConfig.for_model(**model.hf_config)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).to(dev)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()

# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="benchmark one training iteration against transformers, on any device",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--model", default="smollm2-135m", help="embedded model, checkpoint dir, or random:SHAPE "
                    "(smollm2-135m, qwen2.5-1.5b, qwen2.5-7b)")
    ap.add_argument("--env", default="ipd", choices=list(envs.GAMES), help="the game")
    ap.add_argument("--n_games", type=int, default=16, help="games in the iteration (2 trajectories each)")
    ap.add_argument("--max_msg_tokens", type=int, default=32, help="tas: message budget")
    ap.add_argument("--baseline", default="true", choices=["true", "false"], help="also time transformers")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of our rollout and update (median)")
    ap.add_argument("--cuda_graph", default="auto", choices=["auto", "true", "false"],
                    help="replay long decode turns as CUDA graphs; auto: on CUDA, as train.py does (true on a CPU: "
                    "the same fixed-shape steps, eagerly)")
    args = ap.parse_args()
    dev_name, dt = devices.pick_device_dtype(args.device, "auto")
    dev = torch.device(dev_name)
    now = clock(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dt == "bfloat16")
    graph = args.cuda_graph == "true" or args.cuda_graph == "auto" and dev.type == "cuda"
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {args.repeats}")
    cfg = train.resolve(train.defaults() |
                        {"env": args.env, "n_games": args.n_games, "max_msg_tokens": args.max_msg_tokens})
    try:
        model, tok = load_model(args.model, dev, torch.float32)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    memory.check_training(model.cfg, tok, cfg | {"dtype": dt, "device": dev_name}, 1, False, False)   # a size that cannot fit: one line
    peak32, peak16, bw = matmul_peak(dev, torch.float32), matmul_peak(dev, torch.bfloat16), bandwidth(dev)
    peak = peak16 if dt == "bfloat16" else peak32
    print(f"{dev_name} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}): "
          f"matmul fp32 {peak32 / 1e12:.2f} TFLOP/s, bf16 {peak16 / 1e12:.2f} TFLOP/s, copy {bw / 1e9:.0f} GB/s; "
          f"our dtype {dt}")
    pol = LMPolicy(model, tok)
    G = args.n_games
    trained = torch.zeros(2 * G, dtype=torch.bool)
    trained[2 * torch.arange(G) + (torch.arange(G) // cfg["group_size"]) % 2] = True   # AA: one trained seat per game
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # --- ours, after an untimed iteration (kernels loaded, tables built: a training run's steady state). On CUDA
    # it is the whole workload: the first call at each shape picks kernels and grows the allocator's pool (on an
    # H200 the first 128-game IPD rollout took 1.98 s, the next 0.87 s); on a CPU a small one is enough.
    Gw, cfg_w = (G, cfg) if dev.type == "cuda" else (cfg["group_size"], cfg | {"max_msg_tokens": 8})
    ro, _, _ = timed_rollout(model, args.env, pol, Gw, cfg_w, 99, autocast, now, graph)
    model.train()
    train.update(model, None, torch.optim.Adam(model.parameters(), lr=0.0), ro,
                 train.compute_credits(ro.rewards, trained[:2 * Gw], cfg)[0],
                 trained[:2 * Gw], cfg | {"skip_no_signal": False}, autocast)
    roll_t, upd_t = [], []
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)             # one optimizer, as in training (and the baseline)
    for rep in range(args.repeats):
        model.eval()
        replays = GRAPH_STATS["replays"]
        ro, wall, calls = timed_rollout(model, args.env, pol, G, cfg, rep, autocast, now, graph)
        replays = GRAPH_STATS["replays"] - replays
        roll_t.append(wall)
        print(f"rollout {rep + 1}/{args.repeats}: {wall:.2f} s, {len(calls)} model calls + {replays} graph replays", flush=True)
        credit, _ = train.compute_credits(ro.rewards, trained, cfg)
        model.train()
        t0 = now()
        stats = train.update(model, None, opt, ro, credit, trained, cfg | {"skip_no_signal": False}, autocast)
        upd_t.append(now() - t0)
        print(f"update {rep + 1}/{args.repeats}: {upd_t[-1]:.2f} s", flush=True)
    model.eval()
    prefill_s, decode_s = replay(model, calls, autocast, now, dev)        # the last repeat's calls
    model_s = prefill_s + decode_s
    roll_s, upd_s = statistics.median(roll_t), statistics.median(upd_t)
    peak_mem = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    # decode steps: calls that feed at most 8 new tokens per row, and graph replays; what they must read from memory
    dec = [c for c in calls if c[1] <= 8]
    n_steps = len(dec) + replays
    decode_step_s = decode_s / len(dec) if dec else float("nan")     # one decode call, replayed alone at its shapes
    w_bytes = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n or model.cfg.tie_embeddings)
    w_bytes *= 2 if dt == "bfloat16" else 4
    with autocast:
        kv_elem = cache_dtype(model).itemsize                                # the rollout's cache dtype
    kv_bytes = statistics.mean([memory.kv_bytes(model.cfg, B, s0 + T, kv_elem) for B, T, s0, *_ in dec]) if dec else 0.0
    bandwidth_util = (w_bytes + kv_bytes) / bw / decode_step_s if dec else float("nan")
    n_conv = int(ro.length.sum())
    n_sampled = int(ro.action_mask.sum())
    n_dec = int((ro.decision & trained[:, None]).sum())
    n_train_tok = int(ro.length[trained].sum())
    P = len(pol.chat.first(ro.games[0].intro, "")[0])
    micro = devices.micro_batch_tokens(cfg, model.cfg, dev)
    n_mb = len(devices.micro_batches(trained.nonzero().flatten().tolist(), ro.length, micro))
    roll_flops = fwd_flops(model, n_conv - (2 * G - 1) * P, n_sampled)   # each distinct token once
    train_flops = 3 * fwd_flops(model, n_train_tok - (int(trained.sum()) - n_mb) * P, n_dec)
    res = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", dtype=dt, model=args.model,
               env=args.env, n_games=G, rollout_s=roll_s, rollout_tok_s=n_conv / roll_s, decode_step_ms=1e3 * decode_step_s,
               n_decode_steps=n_steps, graph_replays=replays, graph_captures=GRAPH_STATS["captures"],
               graph_failed=GRAPH_STATS["failed"], bandwidth_util=bandwidth_util,
               engine_overhead=roll_t[-1] / model_s if not replays else None,     # replays are not in the replay below
               train_s=upd_s, train_tok_s=n_train_tok / upd_s, rollout_mfu=roll_flops / roll_s / peak,
               train_mfu=train_flops / upd_s / peak, peak_mem_gib=peak_mem, peak_fp32_tflops=peak32 / 1e12,
               peak_bf16_tflops=peak16 / 1e12, bandwidth_gbs=bw / 1e9, conv_tokens=n_conv, train_tokens=n_train_tok,
               update_skipped=stats["skipped"])
    print(f"\nworkload: {G} {args.env} games x {cfg['n_rounds']} rounds = {2 * G} conversations, {n_conv} tokens; "
          f"update on {int(trained.sum())} trained conversations ({n_train_tok} tokens, {n_dec} decision tokens)")
    overhead = (f"model calls alone {model_s:.2f} s -> engine_overhead {res['engine_overhead']:.2f}" if not replays else
                f"engine_overhead not measured ({replays} steps were graph replays)")
    print(f"rollout: {roll_s:.2f} s, {n_conv / roll_s:.0f} tok/s, MFU {res['rollout_mfu']:.1%}; {n_steps} decode steps, "
          f"{res['decode_step_ms']:.1f} ms each for the model alone; {overhead}; "
          f"bandwidth_util {bandwidth_util:.3f}")
    print(f"update: {upd_s:.2f} s, {n_train_tok / upd_s:.0f} tok/s, MFU {res['train_mfu']:.1%}; peak memory {peak_mem:.2f} GiB")
    # --- transformers, same device, same dtype
    if args.baseline == "true":
        del opt
        hf = hf_twin(model, dev)
        hf_roll_s = hf_rollout_baseline(hf, ro, pol.chat.eot, dev, autocast, now)
        hf.train()
        hf_opt = torch.optim.Adam(hf.parameters(), lr=1e-5)
        hf_upd = lambda: hf_update_baseline(hf, hf_opt, ro, credit, trained, micro, dev, autocast, now)
        if dev.type == "cuda":                                         # untimed, as ours was (see above)
            hf_upd()
        hf_upd_s = statistics.median([hf_upd() for _ in range(args.repeats)])
        res.update(hf_generate_s=hf_roll_s, hf_train_s=hf_upd_s, rollout_ratio=hf_roll_s / roll_s,
                   train_ratio=hf_upd_s / upd_s, hf_rollout_mfu=roll_flops / hf_roll_s / peak,
                   hf_train_mfu=train_flops / hf_upd_s / peak)
        print("| phase | ours (s) | ours tok/s | transformers (s) | transformers tok/s | speedup | MFU ours | MFU transformers |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| rollout | {roll_s:.2f} | {n_conv / roll_s:.0f} | {hf_roll_s:.2f} (generate) | {n_conv / hf_roll_s:.0f} | "
              f"{res['rollout_ratio']:.2f}x | {res['rollout_mfu']:.1%} | {res['hf_rollout_mfu']:.1%} |")
        print(f"| update | {upd_s:.2f} | {n_train_tok / upd_s:.0f} | {hf_upd_s:.2f} (fwd+bwd) | {n_train_tok / hf_upd_s:.0f} | "
              f"{res['train_ratio']:.2f}x | {res['train_mfu']:.1%} | {res['hf_train_mfu']:.1%} |")
    print(json.dumps({k: None if isinstance(v, float) and v != v else v for k, v in res.items()}))  # NaN -> null

if __name__ == "__main__":
    main()
