"""
memory.py: what a run will hold in memory, estimated before anything large is allocated, and the check that it
fits. train.py and eval.py stop with one line, naming the knobs to lower, when a size asked for (n_games,
max_msg_tokens, n_rounds, micro_tokens) would not fit in the device's free memory, instead of dying in the
allocator or taking the machine's memory from under its other processes.

Per process, in bytes (table): the fp32 weights, gradients and Adam's two moments (sharded with --fsdp), the
frozen copies (opponent, KL reference), all held throughout; then the larger of the two phases' own memory: the
rollout's KV cache (every seat's whole conversation) or the update's activations (one micro-batch).
`python train.py --dry_run true ...` prints it for any model, device and process count, loading no weights.
"""
import os
import random
import sys

import torch

import envs
from rollout import Chat

GiB = 2 ** 30

def conversation_tokens(env, tok, n_rounds, max_msg_tokens, max_action_tokens=24):
    """The most tokens one seat's conversation can reach: the game's own text (a game of its first fixed strategy
    against itself) and every reply at its longest (an action's longest valid string, a message's budget)."""
    chat = Chat(tok)
    game, play = envs.make_game(env, 0, n_rounds), next(iter(envs.GAMES[env].strategies.values()))
    n, longest, rng = [0, 0], {}, random.Random(0)
    while not game.done:
        for p in game.to_act():
            text, opts = game.observe(p), game.options(p)
            n[p] += sum(map(len, chat.first(game.intro, text[len(game.intro):]))) if not n[p] else len(chat.next(text))
            if opts is None:                                     # a message: its start tag, then its budget
                n[p] += len(chat.encode(envs.MESSAGE_START)) + max_msg_tokens
            else:
                if tuple(opts) not in longest:
                    longest[tuple(opts)] = min(max(len(chat.encode(o)) for o in opts) + 1, max_action_tokens)
                n[p] += longest[tuple(opts)]
            game.act(p, play(game, p, rng))
    return max(n)

def kv_bytes(c, n_rows, tokens, elem=4):
    """The KV cache of n_rows conversations of `tokens` tokens: keys and values of every layer, elem bytes each."""
    return n_rows * tokens * 2 * c.n_layer * c.n_kv_head * c.head_dim * elem

def n_params(c):
    """-> (parameters, those outside the blocks: embedding, final norm, head) of a model.py Config, without weights."""
    outside = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2) + c.n_embd
    block = (c.n_embd * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head) + 3 * c.n_embd * c.n_hidden + 2 * c.n_embd
             + (c.head_dim * (c.n_head + 2 * c.n_kv_head) if c.qkv_bias else 0) + (2 * c.head_dim if c.qk_norm else 0))
    return outside + c.n_layer * block, outside

def table(c, cfg, n_rows, tokens, world=1, opponent=False, reference=False):
    """Bytes per process by item, {item: (on the device, in host memory)}, for a train.py run of cfg on a model of
    Config c: n_rows conversations of up to `tokens` tokens (the KV cache), world processes. Held throughout: the
    fp32 weights, gradients and Adam's two moments (1/world of each with --fsdp; in host memory with
    --fsdp_offload), the frozen copies; then the larger phase: the rollout's KV cache, or the update's activations
    (with --fsdp, plus the parameters and gradients of the blocks gathered at a time: two, and the rest)."""
    n, outside = n_params(c)
    S = world if cfg["fsdp"] else 1
    half = 2 if cfg["dtype"] == "bfloat16" else 4                         # autocast's bytes: the copies, the cache
    state = lambda b: (0, b) if cfg["fsdp_offload"] else (b, 0)
    t = {"weights (fp32)": state(4 * n // S), "gradients": state(4 * n // S), "adam (2 moments)": state(8 * n // S)}
    if cfg["fsdp"]:                                                       # the rollout decodes a full, gathered copy
        t["rollout copy"] = (half * n, 0)
    if opponent:                                                          # it decodes: whole, as the rollout copy
        t["opponent"] = (half * n if cfg["fsdp"] else 4 * n, 0)
    if reference:                                                         # the KL term's model: sharded as the policy
        t["reference"] = state(half * n // S) if cfg["fsdp"] else (4 * n, 0)
    micro = cfg["micro_tokens"] or (512 if cfg["device"].startswith("cuda") else 2560)  # CUDA's automatic: its least
    t["rollout: kv cache"] = (kv_bytes(c, n_rows, tokens, half), 0)
    t["update: activations"] = (micro * 4 * c.n_layer * (8 * c.n_embd + 5 * c.n_hidden), 0)
    if cfg["fsdp"]:
        t["update: gathered"] = (2 * 4 * (outside + 2 * (n - outside) // c.n_layer), 0)
    return t

PHASES = ("rollout: kv cache", "update: activations", "update: gathered")

def peak(t, where=0):
    """Bytes at the peak (where 0: on the device, 1: in host memory): everything held, plus the larger phase."""
    held = sum(v[where] for k, v in t.items() if k not in PHASES)
    update = t["update: activations"][where] + t.get("update: gathered", (0, 0))[where]
    return held + max(t["rollout: kv cache"][where], update)

def show(t, title):
    """The table as text, in GiB."""
    rows = [f"{title}", f"  {'GiB per process':<22} {'device':>8} {'host':>8}"]
    rows += [f"  {k:<22} {d / GiB:>8.2f} {h / GiB:>8.2f}" for k, (d, h) in t.items()]
    return "\n".join(rows + [f"  {'peak':<22} {peak(t) / GiB:>8.2f} {peak(t, 1) / GiB:>8.2f}"])

def free_bytes(dev):
    """What the device can still give: CUDA's free memory, or the host's available memory (/proc/meminfo)."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

def check(need, dev, knobs):
    """Stop with one line if `need` bytes more than are in use do not fit the device's free memory."""
    free = free_bytes(dev)
    if need > free:
        sys.exit(f"error: this needs ~{need / GiB:.1f} GiB more on {dev}, and {free / GiB:.1f} GiB are free: {knobs}")

def check_training(c, tok, cfg, world, opponent, reference):
    """train.py's check, before any weights load: if the run cannot fit, its table, then one line naming what would
    make it fit. -> the table."""
    dev, tokens = cfg["device"], conversation_tokens(cfg["env"], tok, cfg["n_rounds"], cfg["max_msg_tokens"])
    size = lambda **k: table(c, {**cfg, **k}, 2 * cfg["n_games"] // world, tokens, world, opponent, reference)
    t, share = size(), int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dev == "cpu" else 1   # CPU processes share it
    if cfg["dry_run"] or peak(t) * share <= free_bytes(dev):
        return t
    ways = ([("--fsdp true", dict(fsdp=True))] if world > 1 and not cfg["fsdp"] else []) + (
        [("--fsdp true --fsdp_offload true", dict(fsdp=True, fsdp_offload=True))] if dev.startswith("cuda") else [])
    fit = next((w for w, k in ways if peak(size(**k)) * share <= free_bytes(dev)), None)
    print(show(t, f"memory per process on {dev}:"), file=sys.stderr)
    check(peak(t) * share, dev, f"{fit} would fit" if fit else "lower --n_games, --max_msg_tokens, --n_rounds or "
          "--micro_tokens, or shard the state over more processes (torchrun --nproc_per_node N ... --fsdp true)")
    return t

def check_play(pol, env, n_games, n_rounds, max_msg_tokens):
    """eval.py's check for a language-model policy (already loaded): it may hold both seats of every game."""
    tokens = conversation_tokens(env, pol.tok, n_rounds, max_msg_tokens)
    check(kv_bytes(pol.model.cfg, 2 * n_games, tokens), str(next(pol.model.parameters()).device),
          "lower --n_games, --max_msg_tokens or --n_rounds")
