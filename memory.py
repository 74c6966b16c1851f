"""
memory.py: what a run will hold in memory, estimated before anything large is allocated, and the check that it
fits. train.py and eval.py stop with one line, naming the knobs to lower, when a size asked for (n_games,
max_msg_tokens, n_rounds, micro_tokens) would not fit in the device's free memory, instead of dying in the
allocator or taking the machine's memory from under its other processes.

Per process, in bytes: the fp32 weights, the frozen copies (opponent, KL reference), and for training the
gradients and Adam's two moments, all held throughout; then the larger of the two phases' own memory: the
rollout's KV cache (every seat's whole conversation) or the update's activations (one micro-batch).
"""
import os
import random
import sys

import torch

import devices
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

def table(model, n_rows, tokens, micro_tokens=0, bf16=False, copies=0, training=False):
    """Bytes by item for one process: n_rows conversations of up to `tokens` tokens each (the KV cache),
    micro_tokens per forward/backward (the update's activations, as devices.micro_batch_tokens estimates them),
    `copies` frozen fp32 copies of the model. -> {item: bytes}."""
    c, n = model.cfg, sum(p.numel() for p in model.parameters())
    out = {"weights": 4 * n, "frozen copies": 4 * n * copies}
    if training:
        out.update(gradients=4 * n, adam=8 * n, activations=micro_tokens * 4 * c.n_layer * (8 * c.n_embd + 5 * c.n_hidden))
    out["kv_cache"] = n_rows * tokens * 2 * c.n_layer * c.n_kv_head * c.head_dim * (2 if bf16 else 4)
    return out

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

def check(t, dev, knobs, loaded=("weights", "frozen copies")):
    """Stop with one line if what t needs beyond what is already loaded does not fit the device's free memory."""
    phase = max(t.get("kv_cache", 0), t.get("activations", 0))           # the rollout's or the update's
    need = sum(v for k, v in t.items() if k not in loaded and k not in ("kv_cache", "activations")) + phase
    free = free_bytes(dev)
    if need > free:
        items = ", ".join(f"{k} {v / GiB:.2f}" for k, v in t.items())
        sys.exit(f"error: this needs ~{need / GiB:.1f} GiB more on {dev} than is loaded ({items} GiB), and "
                 f"{free / GiB:.1f} GiB are free: lower {knobs}")

def check_training(model, tok, cfg, n_rows, copies):
    """train.py's check, before its run directory is touched. n_rows: this process's conversations."""
    dev = str(next(model.parameters()).device)
    # CUDA's automatic micro-batch takes what is free at update time, down to 512 tokens: count its smallest
    micro = 512 if dev.startswith("cuda") and not cfg["micro_tokens"] else devices.micro_batch_tokens(cfg, model)
    tokens = conversation_tokens(cfg["env"], tok, cfg["n_rounds"], cfg["max_msg_tokens"])
    check(table(model, n_rows, tokens, micro, cfg["dtype"] == "bfloat16", copies, training=True), dev,
          "--n_games, --max_msg_tokens, --n_rounds or --micro_tokens")

def check_play(pol, env, n_games, n_rounds, max_msg_tokens):
    """eval.py's check for a language-model policy: it may hold both seats of every game."""
    tokens = conversation_tokens(env, pol.tok, n_rounds, max_msg_tokens)
    check(table(pol.model, 2 * n_games, tokens), str(next(pol.model.parameters()).device),
          "--n_games, --max_msg_tokens or --n_rounds")
