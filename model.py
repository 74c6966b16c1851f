"""
model.py: a Llama-family transformer in raw PyTorch (Llama/SmolLM2, Qwen2, Qwen3) and its KV cache for
ragged multi-turn batches. Parameter names follow Hugging Face, so load.py reads a checkpoint with a
state_dict copy (asserted key sets and shapes) and writes one transformers can load.

What the rest of the code calls (shapes: B rows, T new tokens, L tokens, V vocabulary):
    Transformer(cfg)                          the network; load.load_model builds and fills one
    model.hidden(idx)                         (B, T) ids -> (B, T, C) last hidden states (no cache)
    model.extend(cache, idx, lengths)         feed (B, T) ragged chunks on top of the cache -> (B, V) next logits
    model.token_logprobs(idx, mask, allowed)  the loss's log-probs and entropies of the masked tokens (train.py)
    KVCache(cfg, B, max_len, device, dtype)   one row per conversation, each at its own length
    sample(logits, temperature, u=...)        inverse-CDF sampling; temperature 0 is argmax
    generate(model, prompts, max_new_tokens)  plain batched generation (serve.py, load.py's chat, the tests)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    vocab_size: int = 49152
    n_embd: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    head_dim: int = 64
    n_hidden: int = 1536          # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None     # None, {"rope_type": "linear", "factor"} or Llama 3.x {"rope_type": "llama3", ...}
    tie_embeddings: bool = True
    qkv_bias: bool = False        # Qwen2
    qk_norm: bool = False         # Qwen3

def rope_inv_freq(cfg):
    """(head_dim/2,) RoPE frequencies, with the scaling variants Llama 3.x checkpoints use."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":  # long wavelengths slowed by `factor`, short ones kept, smooth between
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()

# -----------------------------------------------------------------------------
# the network

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32 like the reference, then cast back
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight

def rotate_half(x):  # Hugging Face's RoPE convention: the two halves of each head are the pairs
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, past=None):
        # x (B, T, C); cos, sin (B, 1, T, hd); mask (B, 1, T, S) bool or None (causal); kv: (k_cache, v_cache,
        # (row (B, 1), slot (B, T)) where this chunk goes, S slots to attend over); past: (k, v) of a shared prefix,
        # (1, nkv, P, hd) each, seen by every row. Returns y and this k, v.
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:  # write this chunk at each row's own end of the cache, attend over the first S slots
            kc, vc, (row, slot), S = kv
            kc[row, :, slot] = k.transpose(1, 2).to(kc.dtype)                     # (B, T, nkv, hd) into (B, nkv, S, hd)
            vc[row, :, slot] = v.transpose(1, 2).to(vc.dtype)
            k, v = kc[:, :, :S], vc[:, :, :S]
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(B, -1, -1, -1), v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), new_kv

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, past=None):
        y, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, past)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv

class KVCache:
    """Preallocated keys/values for a batch of conversations that grow by ragged chunks.

    Row b holds its conversation in slots 0..len[b]-1, with no padding: slot = RoPE position, and a query
    at position p attends to slots <= p of its own row (later slots are stale or another chunk's padding).
    extend() writes row b's chunk at its own end; a row with nothing new (length 0) stays as it was.
    span: a host-side bound on max(len), the slots attention reads; tightened once per turn by reserve()."""
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.len = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) slots used = next position
        self.span = 0

    def reserve(self, n):
        """Before a turn: tighten span to the longest row (one host read), then make room for n more slots
        per row (grow by doubling: rarely, never inside a turn)."""
        self.span = int(self.len.max())
        if self.span + n > self.k.size(3):
            new = max(2 * self.k.size(3), self.span + n)
            grow = lambda x: torch.cat([x, x.new_zeros(*x.shape[:3], new - x.size(3), x.size(4))], 3)
            self.k, self.v = grow(self.k), grow(self.v)

    def take(self, rows, room, out=None):
        """A cache holding a copy of these rows (a long tensor of row indices) and room for `room` more slots,
        to extend those rows alone. out: the cache of an earlier take, reused when it fits (a fresh buffer
        costs more than the copy on a CPU; a new one is as long as this cache, so it fits until this one grows,
        and a decode step captured on it can be replayed). One host read: the first slot these rows can write."""
        (L, _, H, M, D), S = self.k.shape, self.span
        if out is None or out.k.size(1) != len(rows) or out.k.size(3) < S + room:
            out = KVCache.__new__(KVCache)
            out.k = self.k.new_zeros(L, len(rows), H, max(M, S + room), D)   # zeros: slots past a row's end stay finite
            out.v = torch.zeros_like(out.k)
            out.len = torch.zeros_like(self.len[rows])
        out.k[:, :, :, :S], out.v[:, :, :, :S] = self.k[:, rows, :, :S], self.v[:, rows, :, :S]
        out.len.copy_(self.len[rows])                                # in place: a captured step reads this tensor
        out.span, out.first = S, int(out.len.min())
        return out

    def put(self, rows, sub):
        """Write back what take(rows) -> sub gained since: the slots from the first one those rows could write."""
        s0, s1 = sub.first, sub.span
        assert s1 <= self.k.size(3), "reserve the turn's room in this cache before take"
        self.k[:, rows, :, s0:s1], self.v[:, rows, :, s0:s1] = sub.k[:, :, :, s0:s1], sub.v[:, :, :, s0:s1]
        self.len[rows] = sub.len
        self.span = max(self.span, s1)

    def start(self, pasts):
        """Start each row of this empty cache from its past: None or the (k, v), (L, H, n, D) each, of n tokens."""
        n = [0 if kv is None else kv[0].size(2) for kv in pasts]
        self.reserve(max(n))
        for b in [b for b, m in enumerate(n) if m]:
            self.k[:, b, :, :n[b]], self.v[:, b, :, :n[b]], self.len[b] = pasts[b][0], pasts[b][1], n[b]
        self.span = max(n)

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # the "model." prefix of Hugging Face names
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.model.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, pos, dtype):
        freqs = pos[..., None].float() * self.inv_freq                     # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                   # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, idx, pos=None, mask=None, cache=None, prefix_len=0):
        """idx (B, T) -> final normed hidden states (B, T, C). Without a cache: causal over the rows.
        prefix_len P > 0: the first P tokens are the same in every row (a shared prompt): they are
        computed once and every row attends to them (exact, and gradients flow through them once)."""
        B, T = idx.shape
        if prefix_len:
            return self.hidden_shared(idx, prefix_len)
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(pos, x.dtype)
        where = None if cache is None else (torch.arange(B, device=idx.device)[:, None], pos)  # chunk slots
        for i, block in enumerate(self.model.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], where, mask.size(-1))  # attend over the mask's slots
            x = block(x, cos, sin, mask, kv)[0]
        return self.model.norm(x)

    def hidden_shared(self, idx, P):
        B, T = idx.shape
        ar = torch.arange(T, device=idx.device)
        xp, xr = self.model.embed_tokens(idx[:1, :P]), self.model.embed_tokens(idx[:, P:])  # (1, P, C), (B, T-P, C)
        cos_p, sin_p = self.rope(ar[None, :P], xp.dtype)
        cos_r, sin_r = self.rope(ar[None, P:], xr.dtype)
        mask = ar[None, :] <= ar[P:, None]                                 # (T-P, T): prefix + causal
        for block in self.model.layers:
            xp, past = block(xp, cos_p, sin_p, None)
            xr = block(xr, cos_r, sin_r, mask, past=past)[0]
        return self.model.norm(torch.cat([xp.expand(B, -1, -1), xr], dim=1))

    def forward(self, idx):
        """idx (B, T) -> logits (B, T, V), like nanoGPT."""
        return self.lm_head(self.hidden(idx)).float()

    def token_logprobs(self, idx, mask, allowed=None, prefix_len=0, temperature=1.0):
        """Training path. idx (B, T) right-padded, mask (B, T) bool marks the N tokens to score (never
        position 0). Returns fp32 log pi(idx[b, t]) and the policy entropy there, both (N,), row-major.
        allowed (N, K) long, -1 padded: renormalize over those tokens (constrained decoding's policy);
        a row of all -1 means unconstrained. The lm_head runs only at the N predicting positions.
        prefix_len: the rows share their first prefix_len tokens (see hidden). temperature: the policy
        that sampled the tokens (logits / temperature), so the update stays on-policy."""
        h = self.hidden(idx, prefix_len=prefix_len)[:, :-1][mask[:, 1:]]               # (N, C): position t-1 predicts token t
        logp_all = masked_log_softmax(self.lm_head(h).float() / temperature, allowed)  # (N, V)
        logp = logp_all.gather(1, idx[mask][:, None]).squeeze(1)
        p = logp_all.exp()
        entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
        return logp, entropy

    @torch.no_grad()
    def extend(self, cache, idx, lengths, span=None):
        """Append a ragged chunk to every row of the cache and return the logits that predict each row's
        next token. idx (B, T) left-aligned, lengths (B,) real tokens per row (0 = nothing new).
        span: attend over this many slots, a bound the caller keeps (a decode step of fixed shapes, as a
        CUDA graph replays it); default: the cache's own bound, grown by T.
        Returns (B, V) fp32 logits at each row's last real token (meaningless where lengths == 0)."""
        B, T = idx.shape
        S = cache.span + T if span is None else span
        if S > cache.k.size(3):
            raise RuntimeError(f"KV cache full ({cache.k.size(3)} slots): reserve room first")
        if span is None:
            cache.span = S                                                           # a bound on the new max(len)
        pos = cache.len[:, None] + torch.arange(T, device=idx.device)                # (B, T) positions = slots
        mask = torch.arange(S, device=idx.device) <= pos[:, :, None]                 # (B, T, S): own past + causal
        h = self.hidden(idx, pos, mask[:, None], cache)
        cache.len += lengths
        last = (lengths - 1).clamp(min=0)
        return self.lm_head(h[torch.arange(B, device=h.device), last]).float()

def cache_dtype(model):
    """The dtype to keep keys and values in: autocast's where it is on (attention casts them to it at every
    read anyway, so storing them cast gives the same numbers for half the bytes), else the weights'."""
    dev = model.lm_head.weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else model.lm_head.weight.dtype

def masked_log_softmax(logits, allowed=None):
    """logits (N, V) -> log-probs renormalized over allowed (N, K) token ids (-1 padded; a row of all -1
    means every token), i.e. the policy that constrained decoding samples from."""
    logp = F.log_softmax(logits, dim=-1)
    if allowed is None:
        return logp
    logp = masked_logits(logp, allowed)
    return logp - logp.logsumexp(-1, keepdim=True)

def masked_logits(logits, allowed):
    """logits (N, V) with -inf outside each row's allowed ids (N, K), -1 padded; a row of all -1 is free."""
    N, V = logits.shape                                   # padding (-1) goes to an extra column V, then dropped:
    slot = torch.where(allowed < 0, V, allowed)           # no write ever lands on a real token id such as 0
    keep = torch.zeros(N, V + 1, dtype=torch.bool, device=allowed.device).scatter_(1, slot, True)[:, :V]
    return torch.where(keep | (allowed < 0).all(1, keepdim=True), logits, float("-inf"))

# -----------------------------------------------------------------------------
# sampling

def sample(logits, temperature, generator=None, u=None):
    """logits (B, V) -> token ids (B,). Temperature 0 is argmax; otherwise inverse-CDF sampling with uniforms
    u (B,) (drawn from generator if not given), the same distribution as torch.multinomial at a fraction
    of its cost on a CPU, and no host sync on a GPU."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if u is None:  # the uniforms come from the CPU generator on every device, so a seed plays the same games
        u = torch.rand(probs.size(0), generator=generator).to(probs.device)   # on a CPU and a GPU (up to numerics)
    cdf = probs.cumsum(-1)
    # right=True: the first token whose cdf exceeds u, so a zero-probability token is never drawn (even at u = 0)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp(max=probs.size(1) - 1)

@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=(), generator=None, past=None):
    """Batched generation with the KV cache. prompts: list of token-id lists (ragged); the tokens they all begin
    with (a system prompt) are computed once, if no row has a past. max_new_tokens: one for all, or a list, one per
    prompt. Returns the new ids of each row (a list of lists), each ending at its first stop id (included). past: one
    per prompt, None or the (k, v), (L, H, n, D) each, of its first n tokens as an earlier call returned them (a
    conversation's earlier turn: serve.py keeps them), not computed again; with past, returns (ids, each prompt's kv)."""
    dev, B = model.lm_head.weight.device, len(prompts)
    limit = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    lengths = [len(p) for p in prompts]
    P = next((i for i in range(min(lengths) - 1) if len({p[i] for p in prompts}) > 1), min(lengths) - 1)
    rows_past = past or [None] * B
    if B > 1 and P > 0 and not any(rows_past):           # no row has a computed beginning: their shared one, once
        one = KVCache(model.cfg, 1, P, dev, cache_dtype(model))
        model.extend(one, torch.tensor([prompts[0][:P]], device=dev), torch.tensor([P], device=dev))
        rows_past = [(one.k[:, 0], one.v[:, 0])] * B
    start = [0 if kv is None else min(kv[0].size(2), n - 1) for kv, n in zip(rows_past, lengths)]  # 1 token left, at least
    room = max(start) + max(n - s for n, s in zip(lengths, start)) + max(limit)   # rows start at their own lengths
    cache = KVCache(model.cfg, B, room, dev, cache_dtype(model))
    cache.start([kv and (kv[0][:, :, :n], kv[1][:, :, :n]) for kv, n in zip(rows_past, start)])
    prompts = [p[n:] for p, n in zip(prompts, start)]
    idx = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in prompts], batch_first=True).to(dev)   # (B, T)
    logits = model.extend(cache, idx, torch.tensor([len(p) for p in prompts], device=dev))
    kept = past and [(cache.k[:, b, :, :n].clone(), cache.v[:, b, :, :n].clone()) for b, n in enumerate(lengths)]
    out, live, going = [[] for _ in range(B)], torch.arange(B), [True] * B   # live: each row's prompt; going: not ended
    for step in range(max(limit)):
        nxt = sample(logits, temperature, generator)
        for g, b, t in zip(going, live.tolist(), nxt.tolist()):
            out[b] += [t] if g else []
        going = [g and out[b][-1] not in stop_ids and len(out[b]) < limit[b] for g, b in zip(going, live.tolist())]
        if not any(going):                                 # (every row at its end or its limit)
            break
        keep = torch.tensor(going, device=dev)
        if sum(going) <= 0.75 * len(live):                 # drop the rows that ended: a smaller batch steps faster
            rows = keep.nonzero().flatten()
            cache, live, nxt, keep = cache.take(rows, max(limit) - step), live[rows.cpu()], nxt[rows], keep[rows]
            going = [True] * len(rows)
        logits = model.extend(cache, nxt[:, None], keep.long())
    return out if past is None else (out, kept)
