"""
rollout.py: play a batch of games in lockstep and keep the exact token bookkeeping the loss needs (which
tokens were sampled, in which round, by whom, under which mask).

Each turn, every seat that must act gets the game's new text and replies. A language model's replies are
sampled in one batch per policy: actions with a finite format under constrained decoding (a trie of the
valid action strings, each ending with the end-of-turn token, masks the logits, so every action is legal;
a trie node with one child is a forced token, fed without sampling), messages as free text until their end
tag or the token budget. The loss scores the same masked policy (the Rollout records each sampled token's
allowed set), so the update is on-policy; `constrained=False` samples actions freely, to measure a raw
model's invalid rate.

plain_reply below is how one reply is sampled, written plainly. engine.py does the same for all seats at
once with a KV cache, compiled tables and CUDA graphs (the tests check that it samples exactly the same
tokens). Every random number comes from a CPU generator seeded with (seed, iteration) in a fixed order, so
a seed plays the same games on a CPU and a GPU, and in one process or split over several (`local`).
"""
import random
from dataclasses import dataclass

import torch

import envs
from engine import Seats, forced_run
from model import masked_logits, sample

SYSTEM = "You are a player in a game. Follow the answer format exactly."
# -----------------------------------------------------------------------------
# policies

class Chat:
    """The token ids of chat turns for one tokenizer, derived from its chat template (ChatML, Llama 3...)."""
    def __init__(self, tok):
        self.tok = tok
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\x01U\x01"}]
        r1 = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        msgs += [{"role": "assistant", "content": "\x01A\x01"}, {"role": "user", "content": "\x01V\x01"}]
        r2 = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        self.head, self.first_tail = r1.split("\x01U\x01")
        between, self.tail = r2[len(r1):].split("\x01A\x01")[1].split("\x01V\x01")
        self.eot = tok.convert_tokens_to_ids(tok.eos_token) if between.startswith(tok.eos_token) else None
        if self.eot is None:  # templates whose turns end with a special token other than eos (Llama 3)
            self.eot = self.encode(between)[0]
        self.between = between[len(tok.decode([self.eot])):]

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def first(self, shared, text):
        """First turn -> (ids shared by every game of the env, ids of this game's first round)."""
        return self.encode(self.head + shared), self.encode(text + self.first_tail)

    def next(self, text):
        return self.encode(self.between + text + self.tail)

class LMPolicy:
    """A language model playing a seat. `name` labels it in logs."""
    def __init__(self, model, tok, name="model"):
        self.model, self.tok, self.name, self.chat = model, tok, name, Chat(tok)
        self.tries, self.compiled = {}, {}      # the action tries per option set, and the engine's tables of them

    def trie(self, options, start=""):
        """The valid replies (each ending with end-of-turn) as a token trie {token: child}, leaves {}; no
        options: free text, after the forced `start` (a message's start tag). Cached per option set."""
        key = (tuple(options), start)
        if key not in self.tries:
            root = {}
            for ids in [self.chat.encode(s) + [self.chat.eot] for s in options] or [self.chat.encode(start)]:
                node = root
                for t in ids:
                    node = node.setdefault(t, {})
            self.tries[key] = root
        return self.tries[key]

def decisions(node):
    """The most sampling steps on any path through a trie (the uniforms a turn draws)."""
    node = forced_run(node)[1]
    return 1 + max(decisions(c) for c in node.values()) if node else 0

class FixedPolicy:
    """A fixed strategy from envs.py (or anything with reply(game, player, text, rng) -> text)."""
    def __init__(self, env, name):
        strategies = envs.GAMES[env].strategies
        if name not in strategies:
            raise ValueError(f"unknown {env} strategy {name!r}: choose from {', '.join(strategies)}")
        self.name, self.fn = name, strategies[name]

    def reply(self, game, p, text, rng):
        return self.fn(game, p, rng)


# -----------------------------------------------------------------------------
# the batch of trajectories

@dataclass
class Rollout:
    """N = 2 * n_games trajectories (game i's seats are rows 2i and 2i+1), L tokens, T rounds."""
    ids: torch.Tensor            # (N, L) long: the exact token ids of each conversation, right-padded with 0
    length: torch.Tensor         # (N,) tokens per conversation (0 for fixed-strategy seats)
    action_mask: torch.Tensor    # (N, L) bool: sampled (trainable) tokens, end-of-turn tokens included
    token_round: torch.Tensor    # (N, L) long: round index of each token (-1 on padding)
    sampler_logp: torch.Tensor   # (N, L) float: log-prob of each sampled token under the sampler
    sampler_u: torch.Tensor      # (N, L) float: the uniform each sampled token was drawn with (inverse CDF)
    allowed: torch.Tensor        # (N, L, K) long: at each sampled token, the tokens the mask allowed, -1 padded
                                 #   (all -1: free sampling, or not a sampled token)
    decision: torch.Tensor       # (N, L) bool: sampled tokens where the sampler had a choice (the loss's tokens)
    rewards: torch.Tensor        # (N, T) float: per-round rewards (unscaled)
    invalid: torch.Tensor        # (N, T) bool: invalid actions (played as the least cooperative move)
    game: torch.Tensor           # (N,) game index
    group: torch.Tensor          # (N,) group index (games sharing the environment seed)
    seat: torch.Tensor           # (N,) 0 or 1
    policy: torch.Tensor         # (N,) index into the policies list
    games: list                  # the finished envs.Game objects (moves, messages, hands, values per round)

# -----------------------------------------------------------------------------
# play

@torch.no_grad()
def rollout(env, policies, seat_policy, n_games, seed, group_size=1, n_rounds=10, temperature=1.0,
            constrained=True, max_msg_tokens=16, max_action_tokens=24, progress=None, local=None, cuda_graph=False,
            fast=True):
    """Play n_games of env. policies: list of LMPolicy/FixedPolicy; seat_policy (n_games, 2) indices into it.
    Games g and g' share the environment seed when g // group_size == g' // group_size.
    local: the game indices this process plays (a range; default all). The others are stepped as shadows
    with empty moves, so every process draws the same random numbers in the same order and a game plays
    the same however the games are split over processes. fast: decode with engine.py (False: plain_reply,
    slow and simple); cuda_graph: the engine replays long turns as CUDA graphs on a GPU. -> Rollout."""
    gen = torch.Generator().manual_seed(seed)
    local = range(n_games) if local is None else local
    games = [envs.make_game(env, seed * 100003 + g // group_size, n_rounds) for g in range(n_games)]
    rngs = {g: random.Random(seed * 1_000_003 + g) for g in local}        # fixed strategies' dice, per game
    toks = {2 * g + s: dict(ids=[], sampled=[], rnd=[], logp=[], u=[], allowed=[]) for g in local for s in (0, 1)}
    seats = {}                                       # LM policy index -> its engine.Seats (fast) or None (plain)
    for k, pol in enumerate(policies):
        traj = [2 * g + s for g in local for s in (0, 1) if int(seat_policy[g][s]) == k]
        if isinstance(pol, LMPolicy) and traj and fast:
            seats[k] = Seats(pol, traj, pol.chat.first(games[0].intro, "")[0], cuda_graph)
    while not all(g.done for g in games):
        acting = [(gi, p) for gi, g in enumerate(games) if not g.done for p in g.to_act()]
        texts = {(gi, p): games[gi].observe(p) for gi, p in acting}
        replies = {(gi, p): "" for gi, p in acting if gi not in local}   # shadows: the schedule, not the play
        for k, pol in enumerate(policies):
            mine = [(gi, p) for gi, p in acting if int(seat_policy[gi][p]) == k]
            here = [j for j, (gi, p) in enumerate(mine) if gi in local]
            if not mine:
                continue
            if not isinstance(pol, LMPolicy):
                todo = [mine[j] for j in here]
                if hasattr(pol, "replies"):                          # an API: the turn's requests at once, concurrently
                    replies.update(zip(todo, pol.replies([(games[gi], p, texts[(gi, p)]) for gi, p in todo])))
                else:
                    replies.update({(gi, p): pol.reply(games[gi], p, texts[(gi, p)], rngs[gi]) for gi, p in todo})
                continue
            options = {tuple(games[gi].options(p) or ()) for gi, p in mine}
            if len(options) > 1:
                raise RuntimeError("one lockstep turn mixes different action formats; rollout cannot batch it")
            opts = options.pop() if constrained else ()
            trie = pol.trie(opts, envs.MESSAGE_START if constrained else "")  # a message's start tag is fed
            budget = max_action_tokens if opts else max_msg_tokens  # free text: tokens before end-of-turn is forced
            steps = decisions(trie) if opts else budget              # the most sampling steps this turn can take
            u = torch.rand(steps, len(mine), generator=gen) if temperature > 0 else torch.zeros(steps, len(mine))
            if here:                                                 # the turn's uniforms, drawn at once
                replies.update(lm_turn(pol, seats.get(k), [mine[j] for j in here], games, texts, toks, trie,
                                       u[:, here], temperature, budget, free=not opts))
        for (gi, p), text in replies.items():
            games[gi].act(p, text)
        if progress is not None:
            progress.update(1)
    return pack([toks[t] for t in sorted(toks)], [games[g] for g in local], seat_policy[local.start:local.stop],
                group_size, local.start)

def lm_turn(pol, seats, acting, games, texts, toks, trie, u, temperature, budget, free):
    """One turn of the acting seats of one LM policy: 1. record each seat's new text (and the forced start of
    its reply, e.g. the '<' of '<A>'), 2. sample the replies (the engine's Seats, or plain_reply when seats is
    None), 3. record every token of them. u (steps, len(acting)). -> {(game, player): reply text}"""
    chat, (prefix, _) = pol.chat, forced_run(trie)
    chunks = []
    for gi, p in acting:
        t, g, text = 2 * gi + p, games[gi], texts[(gi, p)]
        if not toks[t]["ids"]:                            # the seat's first turn: the system prompt and intro first
            shared, ids = chat.first(g.intro, text[len(g.intro):])
            record(toks[t], shared, 0)
        else:
            ids = chat.next(text)
        record(toks[t], ids, g.round)
        for x in prefix:
            record(toks[t], [x], g.round, sampled=True, allowed=[x])
        chunks.append(ids + prefix)
    if seats is None:
        outs = [plain_reply(pol, toks[2 * gi + p]["ids"], trie, u[:, j], temperature, budget, free)
                for j, (gi, p) in enumerate(acting)]
    else:
        outs = seats.turn([2 * gi + p for gi, p in acting], chunks, trie, u, temperature, budget, free)
    replies = {}
    for (gi, p), out in zip(acting, outs):
        for x, logp, allowed, ux in out:
            record(toks[2 * gi + p], [x], games[gi].round, sampled=True, logp=logp, allowed=allowed, u=ux)
        replies[(gi, p)] = chat.tok.decode([x for x in prefix + [o[0] for o in out] if x != chat.eot])
    return replies

@torch.no_grad()
def plain_reply(pol, ids, trie, u, temperature, budget, free):
    """One reply, sampled the plain way: the whole conversation so far (ids, the reply's forced start included)
    through the model for every token, its next-token logits masked to what may follow, one uniform of u per
    sampled token. An action walks the trie (a forced run is appended without sampling); a message is free text
    until end-of-turn, its end tag, or the budget (then end-of-turn is forced).
    -> [(token, logp, allowed ids or None for any token, uniform)], as the engine returns them."""
    model, eot, dev = pol.model, pol.chat.eot, pol.model.lm_head.weight.device
    node, ids, out, text = forced_run(trie)[1], list(ids), [], []
    over = budget <= 1                     # a message: its end tag was written or its budget spent (end-of-turn next)
    for i in range(len(u)):
        allowed = ([eot] if over else None) if free else list(node)
        logits = model(torch.tensor([ids], device=dev))[:, -1]                       # (1, V)
        lg = masked_logits(logits, torch.tensor([allowed or [-1]], device=dev))      # [-1]: any token
        x = int(sample(lg, temperature, u=u[i:i + 1].to(dev)))
        logp = float(torch.log_softmax(lg / max(temperature, 1e-6), -1)[0, x])
        out.append((x, logp, allowed, float(u[i])))
        ids.append(x)
        if x == eot:
            break
        if free:
            text.append(x)
            over = over or envs.MESSAGE_END in pol.tok.decode(text) or i + 2 >= budget
        else:
            run, node = forced_run(node[x])
            out += [(t, 0.0, [t], 0.0) for t in run]
            ids += run
            if not node:
                break
    return out

def record(tr, ids, rnd, sampled=False, logp=0.0, allowed=None, u=0.0):
    tr["ids"] += ids
    tr["rnd"] += [rnd] * len(ids)
    tr["sampled"] += [sampled] * len(ids)
    tr["logp"] += [logp] * len(ids)
    tr["u"] += [u] * len(ids)
    if sampled:
        tr["allowed"].append(allowed)

def pack(toks, games, seat_policy, group_size, first=0):
    """Lists per trajectory -> padded tensors. first: the index of the first game (of all the processes')."""
    N, L = len(toks), max(1, max(len(t["ids"]) for t in toks))
    def padded(key, dtype, fill=0):                         # (N, L): each trajectory's list, then fill
        out = torch.full((N, L), fill, dtype=dtype)
        for i, t in enumerate(toks):
            out[i, :len(t[key])] = torch.tensor(t[key], dtype=dtype)
        return out
    ids, mask, rnd = padded("ids", torch.long), padded("sampled", torch.bool), padded("rnd", torch.long, -1)
    logp, u = padded("logp", torch.float), padded("u", torch.float)
    K = max([len(a) for t in toks for a in t["allowed"] if a is not None] + [1])
    allowed = torch.full((N, L, K), -1, dtype=torch.long)
    decision = torch.zeros(N, L, dtype=torch.bool)
    for i, t in enumerate(toks):
        pos = mask[i].nonzero().flatten().tolist()          # the sampled tokens, in order
        for j, a in zip(pos, t["allowed"]):
            if a is None:
                decision[i, j] = True                       # free text: a choice over the whole vocabulary
            else:
                allowed[i, j, :len(a)] = torch.tensor(a, dtype=torch.long)
                decision[i, j] = len(a) > 1                 # forced tokens (one legal choice) carry no gradient
    rewards = torch.tensor([[r[s] for r in g.rewards] for g in games for s in (0, 1)], dtype=torch.float)
    invalid = torch.tensor([[i[s] for i in g.invalid] for g in games for s in (0, 1)], dtype=torch.bool)
    game = first + torch.arange(N) // 2
    return Rollout(ids=ids, length=torch.tensor([len(t["ids"]) for t in toks]), action_mask=mask, token_round=rnd,
                   sampler_logp=logp, sampler_u=u, allowed=allowed, decision=decision, rewards=rewards, invalid=invalid, game=game,
                   group=game // group_size, seat=torch.arange(N) % 2,
                   policy=torch.tensor([int(seat_policy[g][s]) for g in range(len(games)) for s in (0, 1)]),
                   games=games)

def readout(ro, env):
    """What each trajectory did, in the game's own terms (envs.Game.readout: IPD cooperation, Split / TAS claims by
    situation) -> (N, T, K, 2): per round, the sum and count of each readout key (a key may not apply in a round)."""
    game = envs.GAMES[env]
    out = torch.zeros(2 * len(ro.games), len(ro.games[0].info) if ro.games else 0, len(game.readout), 2)
    for gi, g in enumerate(ro.games):
        for p in (0, 1):
            for t, info in enumerate(g.info):
                for k, v in game.round_readout(info, p):
                    out[2 * gi + p, t, k] += torch.tensor([v, 1.0])
    return out

def readout_means(x, env):
    """readout() summed down to (K, 2) -> {key: mean} (keys never seen left out)."""
    return {k: (s / n).item() for k, (s, n) in zip(envs.GAMES[env].readout, x) if n > 0}

# -----------------------------------------------------------------------------
# exact action probabilities: the IPD's memory-one readout

MEMORY_ONE = ("opening", "cc", "cd", "dc", "dd")

@torch.no_grad()
def memory_one(pol, n_samples=2000):
    """A policy's P(cooperate) in the IPD at the opening and after one round that ended CC, CD, DC, DD
    (own move first). The game itself is driven to each situation, so the text is the game's own. An LM
    policy's value is exact: the masked probability of the '<A>' branch where the two actions' token
    sequences part (any tokenizer). A fixed strategy's is estimated from n_samples replies. -> dict."""
    situations = [None, ("A", "A"), ("A", "B"), ("B", "A"), ("B", "B")]
    games, texts = [], []                         # texts: what player 0 reads before its first and second move
    for hist in situations:
        g = envs.IPD(0, 2)
        texts.append([g.observe(0)])
        if hist:
            g.act(0, f"<{hist[0]}>"); g.act(1, f"<{hist[1]}>")
            texts[-1].append(g.observe(0))
        games.append(g)
    if not isinstance(pol, LMPolicy):
        rng = random.Random(0)
        return {k: sum(envs.IPD.parse(pol.reply(g, 0, t[-1], rng)) == "A" for _ in range(n_samples)) / n_samples
                for k, g, t in zip(MEMORY_ONE, games, texts)}
    chat, intro = pol.chat, games[0].intro
    a_ids, b_ids = (chat.encode(s) + [chat.eot] for s in games[0].options(0))  # '<A>', '<B>' as this tokenizer splits them
    k = next(i for i, (a, b) in enumerate(zip(a_ids, b_ids)) if a != b)       # the one token where they part
    convs = []
    for hist, t in zip(situations, texts):
        shared, first = chat.first(intro, t[0][len(intro):])
        turn = chat.encode(f"<{hist[0]}>") + [chat.eot] + chat.next(t[1]) if hist else []
        convs.append(shared + first + turn + a_ids[:k])                       # up to the choice
    model, dev = pol.model, pol.model.lm_head.weight.device
    idx = torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in convs], batch_first=True).to(dev)
    h = model.hidden(idx)[torch.arange(len(convs)), torch.tensor([len(c) - 1 for c in convs])]
    logits = model.lm_head(h).float()[:, [a_ids[k], b_ids[k]]]          # (5, 2): renormalized over the legal options
    return dict(zip(MEMORY_ONE, torch.softmax(logits, -1)[:, 0].tolist()))
