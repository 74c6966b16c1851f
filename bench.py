"""
bench.py: how fast is one default training iteration (ipd, the embedded SmolLM2-135M-Instruct, 16 games),
against transformers' own LlamaForCausalLM on the same weights and the same inputs, measured in one run.

    python bench.py                 # ~6 minutes on 2 CPU cores; run it on an otherwise idle machine
    python bench.py --n_games 8     # quicker

Ours: rollout.py (persistent KV cache, shared prompt prefix, constrained decoding) and train.update
(shared-prefix forward+backward, lm_head only at decision tokens, Adam step).
Baselines: (a) every turn, transformers `generate` on each whole conversation so far (how a typical
script plays multi-turn games), replaying our exact conversations; (b) the same loss with transformers'
forward+backward (hidden states of every row, lm_head at the same positions) plus the same Adam step.
MFU = useful model FLOPs / seconds / this machine's matmul peak, measured here. The last line is JSON.
"""
import argparse
import json
import resource
import statistics
import time

import torch

import advantage
import train
from model import embedded_dir, load_model, masked_log_softmax
from rollout import LMPolicy, rollout

def matmul_peak(dtype, reps=5):
    """Best GFLOP/s of F.linear (the path the model takes) over a square shape and the model's own MLP
    shapes, median of reps each."""
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (512, 576, 1536), (2048, 576, 1536)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for _ in range(2):
            torch.nn.functional.linear(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
    return best

def fwd_flops(model, n_tokens, n_logits):
    """Forward FLOPs: 2 per weight per token (embedding lookup excluded) + the lm_head where it runs."""
    cfg = model.cfg
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return 2 * n_body * n_tokens + 2 * cfg.vocab_size * cfg.n_embd * n_logits

@torch.no_grad()
def hf_rollout_baseline(hf, ro, eot):
    """Replay our conversations turn by turn with transformers generate on the whole history."""
    N = ro.ids.size(0)
    n_turns = int(ro.token_round.max()) + 1
    t0 = time.perf_counter()
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
        hf.generate(input_ids=idx, attention_mask=att, max_new_tokens=max(news), min_new_tokens=max(news),
                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=eot)
    return time.perf_counter() - t0

def hf_update_baseline(hf, opt, ro, credit, trained, micro_tokens):
    """The same token-level loss with transformers' forward+backward, plus the same Adam step."""
    tok_credit = train.token_credits(ro, credit)
    decision, allowed_all = train.decision_tokens(ro)
    decision &= trained[:, None]
    n_tok = int(decision.sum())
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for mb in train.micro_batches(trained.nonzero().flatten().tolist(), ro.length, micro_tokens):
        L = int(ro.length[mb].max())
        ids, mask = ro.ids[mb, :L], decision[mb, :L]
        att = (torch.arange(L)[None] < ro.length[mb][:, None]).long()
        h = hf.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1][mask[:, 1:]]
        logp_all = masked_log_softmax(hf.lm_head(h).float(), allowed_all[mb, :L][mask])
        logp = logp_all.gather(1, ids[mask][:, None]).squeeze(1)
        (-(tok_credit[mb, :L][mask] * logp).sum() / n_tok).backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t0

def main():
    ap = argparse.ArgumentParser(description="benchmark one default ipd training iteration against transformers")
    ap.add_argument("--n_games", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of our rollout and update (median)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak on this machine: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    cfg = train.resolve({k: getattr(train, k) for k in train.CONFIG_KEYS} | {"n_games": args.n_games})
    model, tok = load_model()
    pol = LMPolicy(model, tok)
    G = args.n_games
    trained = torch.zeros(2 * G, dtype=torch.bool)
    trained[2 * torch.arange(G) + (torch.arange(G) % 2)] = True    # AA: one trained seat per game
    # --- ours
    roll_t, upd_t = [], []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        ro = rollout("ipd", [pol], torch.zeros(G, 2, dtype=torch.long), G, seed=rep)
        roll_t.append(time.perf_counter() - t0)
        credit, _ = train.compute_credits(ro, trained, cfg)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        t0 = time.perf_counter()
        train.update(model, None, opt, ro, credit, trained, cfg, torch.autocast("cpu", enabled=False))
        upd_t.append(time.perf_counter() - t0)
        model.eval()
    peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # GiB (ru_maxrss is KiB)
    roll_s, upd_s = statistics.median(roll_t), statistics.median(upd_t)
    n_conv = int(ro.length.sum())                                   # conversation tokens of the iteration
    n_sampled = int(ro.action_mask.sum())
    decision, _ = train.decision_tokens(ro)
    n_dec = int((decision & trained[:, None]).sum())
    n_train_tok = int(ro.length[trained].sum())
    # --- transformers
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(embedded_dir(), dtype=torch.float32).eval()
    hf_roll_s = hf_rollout_baseline(hf, ro, pol.chat.eot)
    hf.train()
    hf_opt = torch.optim.Adam(hf.parameters(), lr=1e-5)
    hf_upd_s = statistics.median([hf_update_baseline(hf, hf_opt, ro, credit, trained, cfg["micro_tokens"])
                                  for _ in range(args.repeats)])
    # --- report
    # the useful work: each distinct token once (the shared prompt prefix once per batch), the lm_head
    # where a token is sampled (rollout) or scored (update); forward + backward ~ 3x forward
    P = len(pol.chat.first(ro.games[0].intro, "")[0])
    n_mb = len(train.micro_batches(trained.nonzero().flatten().tolist(), ro.length, cfg["micro_tokens"]))
    roll_flops = fwd_flops(model, n_conv - (2 * G - 1) * P, n_sampled)
    train_flops = 3 * fwd_flops(model, n_train_tok - (int(trained.sum()) - n_mb) * P, n_dec)
    res = dict(rollout_s=roll_s, rollout_tok_s=n_conv / roll_s, hf_generate_s=hf_roll_s,
               hf_generate_tok_s=n_conv / hf_roll_s, rollout_ratio=hf_roll_s / roll_s,
               train_s=upd_s, train_tok_s=n_train_tok / upd_s, hf_train_s=hf_upd_s, hf_train_tok_s=n_train_tok / hf_upd_s,
               train_ratio=hf_upd_s / upd_s, rollout_mfu=roll_flops / roll_s / (peak32 * 1e9),
               train_mfu=train_flops / upd_s / (peak32 * 1e9), hf_rollout_mfu=roll_flops / hf_roll_s / (peak32 * 1e9),
               hf_train_mfu=train_flops / hf_upd_s / (peak32 * 1e9), peak_fp32_gflops=peak32,
               peak_bf16_gflops=peak16, peak_rss_gib=peak_mem, n_games=G, conv_tokens=n_conv)
    print(f"\nworkload: {G} ipd games x 10 rounds = {2 * G} conversations, {n_conv} tokens; "
          f"update on {trained.sum()} trained conversations ({n_train_tok} tokens, {n_dec} decision tokens)")
    print("| phase | ours (s) | ours tok/s | transformers (s) | transformers tok/s | speedup | MFU ours | MFU transformers |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| rollout | {roll_s:.1f} | {n_conv / roll_s:.0f} | {hf_roll_s:.1f} (generate) | {n_conv / hf_roll_s:.0f} | "
          f"{res['rollout_ratio']:.2f}x | {res['rollout_mfu']:.1%} | {res['hf_rollout_mfu']:.1%} |")
    print(f"| update | {upd_s:.1f} | {n_train_tok / upd_s:.0f} | {hf_upd_s:.1f} (fwd+bwd) | {n_train_tok / hf_upd_s:.0f} | "
          f"{res['train_ratio']:.2f}x | {res['train_mfu']:.1%} | {res['hf_train_mfu']:.1%} |")
    print(f"peak memory (process RSS) after our iteration: {peak_mem:.2f} GiB; MFU against the fp32 peak "
          f"{peak32:.0f} GFLOP/s (bf16 measured {peak16:.0f})")
    print(json.dumps(res))

if __name__ == "__main__":
    main()
