"""
memory.py: what a run will hold in memory, estimated before anything large is allocated, and the check that it
fits. train.py and eval.py stop with one line, naming the knobs to lower, when a size asked for (n_games,
max_msg_tokens, n_rounds, micro_tokens) would not fit in the device's free memory, instead of dying in the
allocator or taking the machine's memory from under its other processes.

Per process, in bytes (table): the fp32 weights, gradients and Adam's two moments (sharded with --fsdp), the
frozen copies (opponent, KL reference), all held throughout; then the largest phase's own memory: the rollout's KV
cache (every seat's whole conversation), the update's activations (one micro-batch), with --fsdp loading and a
checkpoint.
`python train.py --dry_run true ...` prints it for any model, device and process count, loading no weights.
"""
import os
import random
import sys

import torch

import devices
import envs
from load import model_config
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
    --fsdp_offload), the frozen copies; then the largest phase: with --fsdp, loading (each process reads the whole
    model before sharding it) and a checkpoint (process 0 gathers the whole state); the rollout's KV cache; the
    update's activations (plain in bf16, plus autocast's bf16 copies of the weights, kept for backward; with --fsdp,
    plus the parameters and gradients gathered at a time: the embedding and head, and two blocks). A sharded bf16
    run's copies hold the blocks in bf16 and the rest in fp32 (devices.as_computed)."""
    n, outside = n_params(c)
    shards, bf16 = (world if cfg["fsdp"] else 1), cfg["dtype"] == "bfloat16"
    copy = (2 * (n - outside) + 4 * outside) / n if bf16 else 4           # bytes a parameter of a sharded run's copies
    host = lambda b: (b, 0) if cfg["device"] == "cpu" else (0, b)         # on a CPU, the host is the device
    held = lambda b: host(b) if cfg["fsdp_offload"] else (b, 0)           # the sharded state
    t = {"weights (fp32)": held(4 * n // shards), "gradients": held(4 * n // shards), "adam (2 moments)": held(8 * n // shards)}
    if cfg["fsdp"]:                                                       # the rollout decodes a full, gathered copy
        t["rollout copy"] = (int(copy * n), 0)
    if opponent:                                                          # it decodes: whole, as the rollout copy
        t["opponent"] = (int(copy * n) if cfg["fsdp"] else 4 * n, 0)
    if reference:                                                         # the KL term's model: sharded as the policy
        t["reference"] = held(int(copy * n) // shards) if cfg["fsdp"] else (4 * n, 0)
    if cfg["fsdp"]:
        t["loading: whole model"] = host(6 * n)                           # a bf16 checkpoint and its fp32 cast
        t["checkpoint: process 0"] = host(12 * n)                         # the whole weights and Adam state, gathered
    cuda_auto = cfg["device"].startswith("cuda") and not cfg["micro_tokens"]   # what free memory holds, 512 at least
    micro = 512 if cuda_auto else devices.micro_batch_tokens(cfg, c, "cpu")
    t["rollout: kv cache"] = (kv_bytes(c, n_rows, tokens, 2 if bf16 else 4), 0)
    autocast = 2 * n if bf16 and not cfg["fsdp"] else 0                   # its bf16 copies of the weights, till backward
    t["update: activations"] = (micro * devices.activation_bytes(c) + autocast, 0)
    if cfg["fsdp"]:                                                       # the root (+ the head's autocast copy), two
        t["update: gathered"] = ((8 + 2 * bf16) * outside + 2 * 8 * (n - outside) // c.n_layer, 0)   # blocks
    return t

def peak(t, where=0):
    """Bytes at the peak (where 0: on the device, 1: in host memory): everything held, plus the largest phase."""
    get = lambda k: t.get(k, (0, 0))[where]
    held = sum(v[where] for k, v in t.items() if ":" not in k)             # the phases' items are named "phase: ..."
    return held + max(get("loading: whole model"), get("checkpoint: process 0"), get("rollout: kv cache"),
                      get("update: activations") + get("update: gathered"))

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

def measured(model, opt, dev):
    """What this process holds of the policy's weights and Adam's state (a shard of each with --fsdp), and has held
    at most: its resident set (max RSS), and on a GPU the allocator's peak. -> {name: bytes}, for the log."""
    import resource
    out = {"param_bytes": devices.local_bytes(model.parameters()),
           "optim_bytes": devices.local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
           "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}   # (Linux: KiB)
    if str(dev).startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out

def check_training(c, tok, cfg, world, opponent, reference):
    """train.py's check, before any weights load: if the run cannot fit (on its device, or in host memory, which a
    machine's processes share), its table, then one line naming what would make it fit. -> the table."""
    dev, tokens = cfg["device"], conversation_tokens(cfg["env"], tok, cfg["n_rounds"], cfg["max_msg_tokens"])
    size = lambda **k: table(c, {**cfg, **k}, 2 * cfg["n_games"] // world, tokens, world, opponent, reference)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))                  # a margin: on a CPU the table came within
    others = lambda t: peak({k: v for k, v in t.items() if k != "checkpoint: process 0"}, 1)   # 10% of max RSS
    need = lambda t: (1.1 * peak(t) * (local if dev == "cpu" else 1), 1.1 * (peak(t, 1) + (local - 1) * others(t)))
    fits = lambda t: need(t)[0] <= free_bytes(dev) and (dev == "cpu" or need(t)[1] <= free_bytes("cpu"))
    t = size()
    if cfg["dry_run"] or fits(t):
        return t
    ways = ([("--fsdp true", dict(fsdp=True))] if world > 1 and not cfg["fsdp"] else []) + (
        [("--fsdp true --fsdp_offload true", dict(fsdp=True, fsdp_offload=True))] if dev.startswith("cuda") else [])
    fit = next((w for w, k in ways if fits(size(**k))), None)
    print(show(t, f"memory per process on {dev}:"), file=sys.stderr)
    d, h = need(t)
    sys.exit(f"error: this needs ~{d / GiB:.1f} GiB on {dev} ({free_bytes(dev) / GiB:.1f} free)"
             + ("" if dev == "cpu" else f" and ~{h / GiB:.1f} GiB of host memory ({free_bytes('cpu') / GiB:.1f} free)")
             + (f": {fit} would fit" if fit else ": lower --n_games, --max_msg_tokens, --n_rounds or --micro_tokens, "
                "or shard the state over more processes (torchrun --nproc_per_node N ... --fsdp true)"))

def plan(cfg, name, world, rank):
    """train.py's memory plan, before any weights of model `name` load: with --dry_run, print the table (process 0)
    -> True, to stop there; else check_training's check -> False."""
    try:
        c, tok = model_config(name)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    op = cfg["opponent"]
    decodes = op not in envs.GAMES[cfg["env"]].strategies and not op.startswith("api:") and (op or cfg["algo"] == "adalign")
    t = check_training(c, tok, cfg, world, bool(decodes), cfg["kl_coef"] > 0)
    if cfg["dry_run"] and rank == 0:
        print(show(t, f"{cfg['model_name']} ({n_params(c)[0] / 1e9:.2f}B parameters) on {cfg['device']}, {world} "
                      f"process(es), fsdp {cfg['fsdp']}, offload {cfg['fsdp_offload']}, dtype {cfg['dtype']}:"))
    return cfg["dry_run"]

def check_play(pol, env, n_games, n_rounds, max_msg_tokens):
    """eval.py's check for a language-model policy (already loaded), which may hold both seats of every game: stop
    with one line if their KV cache does not fit the device's free memory."""
    dev, tokens = str(next(pol.model.parameters()).device), conversation_tokens(env, pol.tok, n_rounds, max_msg_tokens)
    need, free = kv_bytes(pol.model.cfg, 2 * n_games, tokens), free_bytes(dev)
    if need > free:
        sys.exit(f"error: this needs ~{need / GiB:.1f} GiB more on {dev}, and {free / GiB:.1f} GiB are free: "
                 "lower --n_games, --max_msg_tokens or --n_rounds")
