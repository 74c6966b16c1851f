"""
rollout.py: play a batch of games in lockstep with batched, KV-cached sampling, and keep the exact
token bookkeeping that the loss needs (which tokens were sampled, in which round, by whom).

Each turn, every LM-played seat that must act is sampled in one batched model call per policy: the game's
new text is appended to that seat's conversation in the persistent KV cache (earlier turns are never
recomputed), then the reply is decoded. Actions with a finite format use constrained decoding (SPEC 3.7):
a trie over the token sequences of the valid action strings (each ending with the end-of-turn token)
masks the logits, so every action is legal. Runs of forced tokens (a trie node with one child) are fed
as one chunk without sampling. The loss uses the same masked, renormalized policy (the Rollout records
each sampled token's allowed set), which makes the update on-policy; `constrained=False` samples actions
freely to measure the raw model's invalid rate.

The decode loop is built for a GPU: every row's state (its trie state compiled to integer tables, or free
text with an end-tag automaton) is a tensor, one step is the same tensor program for all rows, the turn's
random numbers are drawn at once, and the host reads the results once per turn (with cuda_graph, a long turn's
step has fixed shapes and buffers, and a GPU replays it as a captured CUDA graph). Every random number comes
from a CPU generator seeded with (seed, iteration) in a fixed order, so a seed plays the same games on a
CPU and a GPU, and in one process or split over several (`local`).
"""
import json
import os
import random
import time
import urllib.request
import weakref
from dataclasses import dataclass

import torch

import envs
from model import KVCache, allowed_mask, cache_dtype, sample

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

END_TAGS = {}   # (tokenizer, vocabulary size, device) -> end-tag automaton

class LMPolicy:
    """A language model playing a seat. `name` labels it in logs."""
    def __init__(self, model, tok, name="model"):
        self.model, self.tok, self.name, self.chat = model, tok, name, Chat(tok)
        self.compiled, self.end_table = {}, None

    def tables(self, options, start=""):
        """The valid strings (each ending with end-of-turn) as a token trie {tok: child}, compiled for the
        device (Tables); () compiles free text, fed `start` first (forced). Cached per option set."""
        key = (tuple(options), start)
        if key not in self.compiled:
            root = {}
            for s in options:
                node = root
                for t in self.chat.encode(s) + [self.chat.eot]:
                    node = node.setdefault(t, {})
            if not options and start:                                   # free text after a forced start
                node = root
                for t in self.chat.encode(start):
                    node = node.setdefault(t, {})
            self.compiled[key] = compile_trie(root, self.chat.eot, self.model.lm_head.weight.device)
        return self.compiled[key]

    def end_tag(self):
        """The automaton that finds a message's end tag in free text (built once, a few seconds)."""
        if self.end_table is None:
            dev = self.model.lm_head.weight.device
            key = (self.tok.name_or_path, len(self.tok), str(dev))      # shared by policies of one tokenizer
            if key not in END_TAGS:
                END_TAGS[key] = end_tag_table(self.tok, envs.MESSAGE_END, dev)
            self.end_table = END_TAGS[key]
        return self.end_table

class FixedPolicy:
    """A fixed strategy from envs.py (or anything with reply(game, player, text, rng) -> text)."""
    def __init__(self, env, name):
        if name not in envs.STRATEGIES[env]:
            raise ValueError(f"unknown {env} strategy {name!r}: choose from {', '.join(envs.STRATEGIES[env])}")
        self.name, self.fn = name, envs.STRATEGIES[env][name]

    def reply(self, game, p, text, rng):
        return self.fn(game, p, rng)


class ApiPolicy:
    """A chat model behind an OpenAI-compatible /chat/completions endpoint (key from $OPENAI_API_KEY).
    Any fault (transport, status, malformed or oversized reply) is retried, then counted in `failures` and
    played as an empty reply: the game scores it as an invalid move. After max_fails failures in a row the
    endpoint is taken as dead and not called again (every later reply fails at once)."""
    def __init__(self, url, model, timeout=30.0, retries=2, max_reply_chars=2000, max_fails=5):
        self.url, self.model_id = url.rstrip("/"), model
        self.timeout, self.retries = min(max(timeout, 0.1), 300.0), min(max(retries, 0), 5)     # sane caps
        self.max_reply_chars, self.max_fails = min(max(max_reply_chars, 16), 100_000), max_fails
        self.name = f"api:{model}"
        self.key = os.environ.get("OPENAI_API_KEY", "")
        self.history = weakref.WeakKeyDictionary()     # game -> {player: messages}: a new game never inherits one
        self.failures, self.calls, self.fails_in_row = 0, 0, 0

    def reply(self, game, p, text, rng):
        msgs = self.history.setdefault(game, {}).setdefault(p, [{"role": "system", "content": SYSTEM}])
        msgs.append({"role": "user", "content": text})
        self.calls += 1
        answer = self.ask(msgs) if self.fails_in_row < self.max_fails else None
        if answer is None:
            self.failures += 1
            self.fails_in_row += 1
            answer = ""
        else:
            self.fails_in_row = 0
        msgs.append({"role": "assistant", "content": answer})
        return answer

    def ask(self, msgs):
        """One reply, or None after the retries. Nothing is printed: the request carries the key."""
        body = json.dumps({"model": self.model_id, "messages": msgs, "temperature": 1.0, "max_tokens": 200}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = "Bearer " + self.key
        limit = 64 * self.max_reply_chars + 65536                       # bytes of JSON read at most
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url + "/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read(limit + 1)
                if len(raw) <= limit:
                    answer = json.loads(raw)["choices"][0]["message"]["content"]
                    if isinstance(answer, str):
                        return answer[:self.max_reply_chars]
            except Exception:   # any fault of the far side: URLError, HTTPException, IncompleteRead, bad JSON...
                pass
            if attempt < self.retries:
                time.sleep(0.2 * (attempt + 1))
        return None

class HumanPolicy:
    """You, at the terminal. End of input (Ctrl-D) stops the evaluation with a message."""
    name = "human"

    def reply(self, game, p, text, rng):
        print(f"\n[game {id(game) % 1000}, you are player {p}] {text}")
        try:
            return input("> ")
        except EOFError:
            raise SystemExit("input ended (EOF): stopping the games") from None

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
            constrained=True, max_msg_tokens=16, max_action_tokens=24, progress=None, local=None, cuda_graph=False):
    """Play n_games of env. policies: list of LMPolicy/FixedPolicy; seat_policy (n_games, 2) indices into it.
    Games g and g' share the environment seed when g // group_size == g' // group_size.
    local: the game indices this process plays (a range; default all). The others are stepped as shadows
    with empty moves, so every process draws the same random numbers in the same order and a game plays
    the same however the games are split over processes. cuda_graph: decode long turns as a fixed-shape step,
    captured as a CUDA graph on a GPU (on a CPU the same steps run eagerly: for tests). -> Rollout."""
    gen = torch.Generator().manual_seed(seed)
    local = range(n_games) if local is None else local
    games = [envs.make_game(env, seed * 100003 + g // group_size, n_rounds) for g in range(n_games)]
    rngs = {g: random.Random(seed * 1_000_003 + g) for g in local}        # fixed strategies' dice, per game
    toks = {2 * g + s: dict(ids=[], sampled=[], rnd=[], logp=[], u=[], allowed=[]) for g in local for s in (0, 1)}
    rows = {}  # LM policy index -> {"traj": [trajectory ids], "cache": KVCache, "pending": [[ids not yet fed]]}
    for k, pol in enumerate(policies):
        if isinstance(pol, LMPolicy):
            traj = [2 * g + s for g in local for s in (0, 1) if int(seat_policy[g][s]) == k]
            if traj:
                m = pol.model
                rows[k] = dict(traj=traj, pending=[[] for _ in traj], shared=pol.chat.first(games[0].intro, "")[0],
                               cache=KVCache(m.cfg, len(traj), 256, m.lm_head.weight.device, cache_dtype(m)),
                               graphs={} if cuda_graph else None)      # decode's TurnStates (and graphs) by shape
    while not all(g.done for g in games):
        acting = [(gi, p) for gi, g in enumerate(games) if not g.done for p in g.to_act()]
        texts = {(gi, p): games[gi].observe(p) for gi, p in acting}
        replies = {(gi, p): "" for gi, p in acting if gi not in local}   # shadows: the schedule, not the play
        for k, pol in enumerate(policies):
            mine = [(gi, p) for gi, p in acting if int(seat_policy[gi][p]) == k]
            if not mine:
                continue
            here = [j for j, (gi, p) in enumerate(mine) if gi in local]
            if isinstance(pol, LMPolicy):
                options = {tuple(games[gi].options(p) or ()) for gi, p in mine}
                if len(options) > 1:
                    raise RuntimeError("one lockstep turn mixes different action formats; rollout cannot batch it")
                opts = options.pop() if constrained else ()
                tab = pol.tables(opts, envs.MESSAGE_START if constrained else "")  # a message's start tag is fed
                budget = max_action_tokens if opts else max_msg_tokens  # free text: tokens before end-of-turn is forced
                steps = tab.depth if opts else budget                    # the most sampling steps this turn can take
                u = torch.rand(steps, len(mine), generator=gen) if temperature > 0 else torch.zeros(steps, len(mine))
                if here:                                                 # the turn's uniforms, drawn at once
                    replies.update(lm_turn(pol, rows[k], [mine[j] for j in here], games, texts, toks, tab, u[:, here],
                                           temperature, budget, None if opts else pol.end_tag()))
            else:
                for gi, p in (mine[j] for j in here):
                    replies[(gi, p)] = pol.reply(games[gi], p, texts[(gi, p)], rngs[gi])
        for (gi, p), text in replies.items():
            games[gi].act(p, text)
        if progress is not None:
            progress.update(1)
    return pack([toks[t] for t in sorted(toks)], [games[g] for g in local], seat_policy[local.start:local.stop],
                group_size, n_rounds, local.start)

def lm_turn(pol, st, acting, games, texts, toks, tab, u, temperature, budget, end_tag):
    """One turn for the acting seats of one LM policy: 1. feed their new text, 2. decode until every row
    ended its reply, 3. record. u (steps, len(acting)): the turn's uniforms; end_tag: the automaton of a
    free-text turn (None for an action). -> {(game, player): reply text}"""
    index = {t: r for r, t in enumerate(st["traj"])}
    rows = [index[2 * gi + p] for gi, p in acting]
    idx, lengths = feed(pol, st, acting, rows, games, texts, toks, tab)
    cache, R = st["cache"], len(st["traj"])
    room = idx.size(1) + u.size(0) * (1 + tab.chain.size(2))     # the most slots the turn adds: it never grows mid-turn
    cache.reserve(room)
    if len(rows) == R:                       # every row acts (IPD, Split, proposals): decode in place
        u_rows = torch.zeros(u.size(0), R)
        u_rows[:, rows] = u
        ts = decode(pol, cache, tab, idx, lengths, rows, u_rows, temperature, budget, end_tag, st["graphs"])
        cols, u = rows, u_rows
    else:                                    # some rows act (a TAS message): decode a copy of them, write it back
        sel = torch.tensor(rows, device=idx.device)
        st["sub"] = sub = cache.take(sel, room, st.get("sub"))
        ts = decode(pol, sub, tab, idx[sel], lengths[sel], range(len(rows)), u, temperature, budget, end_tag,
                     st["graphs"])
        cache.put(sel, sub)
        cols = range(len(rows))
    return record_turn(pol, st, tab, acting, rows, cols, games, toks, ts, u)

def feed(pol, st, acting, rows, games, texts, toks, tab):
    """Each acting row's new text (after the tokens it sampled last turn, not yet in the cache, and before
    the forced start of its action, e.g. the '<' of '<A>'/'<B>'), recorded. -> one ragged chunk for the
    model: idx (R, T) and lengths (R,) on its device (0 for rows that do not act)."""
    model, chat, cache = pol.model, pol.chat, st["cache"]
    dev = cache.k.device
    if cache.span == 0:  # the system prompt and intro are the same for all rows: compute them once, copy
        shared = st["shared"]
        one = KVCache(model.cfg, 1, len(shared), dev, cache.k.dtype)
        model.extend(one, torch.tensor([shared], device=dev), torch.tensor([len(shared)], device=dev))
        cache.fill_from(one)
        for t in st["traj"]:
            record(toks[t], shared, 0)
    chunks = [[] for _ in st["traj"]]
    for (gi, p), r in zip(acting, rows):
        t, g, text = 2 * gi + p, games[gi], texts[(gi, p)]
        if len(toks[t]["ids"]) == len(st["shared"]):   # this seat's first turn
            assert text.startswith(g.intro)
            ids = chat.first(g.intro, text[len(g.intro):])[1]
        else:
            ids = chat.next(text)
        record(toks[t], ids, g.round)
        for tok in tab.prefix:
            record(toks[t], [tok], g.round, sampled=True, logp=0.0, allowed=[tok])
        chunks[r], st["pending"][r] = st["pending"][r] + ids + tab.prefix, []
    idx = torch.zeros(len(chunks), max(len(c) for c in chunks), dtype=torch.long)
    for r, c in enumerate(chunks):
        idx[r, :len(c)] = torch.tensor(c, dtype=torch.long)
    return idx.to(dev), torch.tensor([len(c) for c in chunks], device=dev)

GRAPH_STATS = {"turns": 0, "captures": 0, "replays": 0, "failed": 0}   # fixed-shape decode turns; CUDA graphs
_capture_stream = None

@dataclass
class TurnState:
    """What a decode step reads and writes, for R rows, `steps` steps and forced runs of up to F tokens, on the
    model's device. A step captured as a CUDA graph replays on exactly these tensors."""
    state: torch.Tensor          # (R,) long: trie state, or FREE / EOT / DONE
    tag: torch.Tensor            # (R,) long: end-tag automaton state (free text)
    i: torch.Tensor              # (1,) long: the step
    u: torch.Tensor              # (steps, R): the turn's uniforms
    idx: torch.Tensor            # (R, 1 + F) long: the tokens fed at the next step
    lengths: torch.Tensor        # (R,) long: how many of them are real (0: the row ended its reply)
    tok: torch.Tensor            # (steps, R, 1 + F) long: each step's sampled token then its forced run, -1 where nothing
    logp: torch.Tensor           # (steps, R): the sampled tokens' log-probs
    sampled_in: torch.Tensor     # (steps, R) long: the state each was sampled in
    graph: object = None         # the captured step (a CUDA graph), False if its capture failed

    @staticmethod
    def empty(R, steps, F, dev):
        z = lambda *shape, dtype=torch.long: torch.empty(*shape, dtype=dtype, device=dev)
        return TurnState(z(R), z(R), z(1), z(steps, R, dtype=torch.float), z(R, 1 + F), z(R), z(steps, R, 1 + F),
                         z(steps, R, dtype=torch.float), z(steps, R))

    def reset(self, start, u, done):
        self.state.copy_(start)
        self.tag.zero_()
        self.i.zero_()
        self.u.copy_(u)
        self.tok.fill_(-1)
        self.logp.zero_()
        self.sampled_in.fill_(done)

@torch.no_grad()
def decode(pol, cache, tab, idx, lengths, rows, u, temperature, budget, end_tag, graphs=None):
    """Feed the chunk, then sample until every acting row has ended its reply. The state of every row lives in
    tensors on the model's device (TurnState); a step is the same tensor program for all rows (rows that are
    done ride along, masked). No Python per row and no host read inside the turn but the every-`check`-steps
    test that all rows are done. graphs: None, or a dict that keeps TurnStates by shape: then a turn of more
    than 3 steps attends over a fixed number of slots (its bound rounded up to 256), so on a GPU its step is
    captured once as a CUDA graph and replayed (on a CPU the same steps run eagerly: the tests' check of them).
    The cache already has room for the turn (lm_turn). u (steps, R): the uniforms of each step.
    -> the TurnState, its tok, logp and sampled_in filled."""
    dev, (steps, R), F = idx.device, u.shape, tab.chain.size(2)
    start = torch.full((R,), tab.DONE, dtype=torch.long)
    start[rows] = tab.start if end_tag is None else (tab.FREE if budget > 1 else tab.EOT)
    span, key, ts = None, None, None
    if graphs is not None and steps > 3:
        bound = cache.span + idx.size(1) + (steps - 1) * (1 + F)               # the most slots any step reads
        span = min(cache.k.size(3), -(-bound // 256) * 256)
        key = (cache.k.data_ptr(), cache.v.data_ptr(), cache.len.data_ptr(), tuple(cache.k.shape), span, id(tab),
               id(end_tag), budget, temperature, steps)        # a graph reads and writes these addresses
        ts = graphs.get(key)
        GRAPH_STATS["turns"] += 1
    if ts is None:
        ts = TurnState.empty(R, steps, F, dev)
        if key is not None:
            graphs[key] = ts
    ts.reset(start, u, tab.DONE)
    step = lambda idx, lengths: decode_step(pol, cache, tab, ts, idx, lengths, span, temperature, budget, end_tag)
    step(idx, lengths)                                                          # the chunk: its own shape
    check = 1 if dev.type == "cpu" else 8
    for n in range(1, steps):
        if n % check == 0 and bool((ts.state == tab.DONE).all()):
            break
        if ts.graph is None and key is not None and can_capture(dev):
            ts.graph = capture(lambda: step(ts.idx, ts.lengths))                # runs step n, then captures it
        elif ts.graph:
            ts.graph.replay()
            GRAPH_STATS["replays"] += 1
        else:
            step(ts.idx, ts.lengths)
    if span is not None:
        cache.span = int(cache.len.max())                   # the bound the fixed-shape steps did not keep
    return ts

def decode_step(pol, cache, tab, ts, idx, lengths, span, temperature, budget, end_tag):
    """One decode step for every row, in place on the TurnState ts: feed idx, sample, move each row's state."""
    state, i, eot = ts.state, ts.i, pol.chat.eot
    logits = pol.model.extend(cache, idx, lengths, span)                    # (R, V)
    allowed = tab.allowed[state]                                            # (R, K), -1 padded; all -1 = free
    lg = masked_logits(logits, allowed)
    nxt = sample(lg, temperature, u=ts.u.index_select(0, i)[0])            # (R,)
    logp = torch.log_softmax(lg / max(temperature, 1e-6), -1).gather(1, nxt[:, None]).squeeze(1)
    k = (allowed == nxt[:, None]).int().argmax(1)                           # which option of the state
    chain, n_chain, new = tab.chain[state, k], tab.chain_len[state, k], tab.next[state, k]
    if end_tag is not None:                                                 # free text: end tag, budget
        ts.tag.copy_(end_tag[ts.tag, nxt])
        over = (ts.tag == end_tag.size(0) - 1) | (i + 2 >= budget)
        new = torch.where((state == tab.FREE) & over, tab.EOT, new)
    new = torch.where((nxt == eot) | (state == tab.EOT) | (state == tab.DONE), tab.DONE, new)
    live = state != tab.DONE
    ts.tok.index_copy_(0, i, torch.where(live[:, None], torch.cat([nxt[:, None], chain], 1), -1)[None])
    ts.logp.index_copy_(0, i, logp[None])
    ts.sampled_in.index_copy_(0, i, state[None])
    ts.idx.copy_(torch.cat([nxt[:, None], chain.clamp(min=0)], 1))         # fed next step, unless the row
    ts.lengths.copy_(torch.where(live & (new != tab.DONE), 1 + n_chain, 0))   # ended: then with the next turn
    state.copy_(new)
    i.add_(1)

def can_capture(dev):
    return dev.type == "cuda"

def capture(step):
    """Run step once on a side stream (the real step: it warms up what a capture cannot set up, e.g. cuBLAS's
    workspace for that stream), then capture it there as a CUDA graph. -> the graph, or False if the capture
    failed (counted in GRAPH_STATS, reported once; the turn goes on eagerly)."""
    global _capture_stream
    side = _capture_stream = _capture_stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            step()
    except RuntimeError as e:
        GRAPH_STATS["failed"] += 1
        if GRAPH_STATS["failed"] == 1:
            print(f"warning: CUDA graph capture failed, decoding eagerly ({str(e).splitlines()[0][:200]})")
        return False
    GRAPH_STATS["captures"] += 1
    return graph

def record_turn(pol, st, tab, acting, rows, cols, games, toks, ts, u):
    """One read of the turn's buffers: every token into its trajectory (a sampled one with its log-prob, the
    allowed set of its state and its uniform; a forced one with log-prob 0), the tokens of the last step
    kept to be fed with the row's next text. rows: each acting seat's cache row; cols: its column in the
    buffers. -> {(game, player): reply text}"""
    chat = pol.chat
    out_tok, out_logp, out_state = ts.tok.cpu(), ts.logp.cpu(), ts.sampled_in.cpu()
    replies = {}
    for (gi, p), r, c in zip(acting, rows, cols):
        t, g, out = 2 * gi + p, games[gi], list(tab.prefix)
        for i in range(out_state.size(0)):
            s = int(out_state[i, c])
            if s == tab.DONE:
                break
            step = [x for x in out_tok[i, c].tolist() if x >= 0]
            record(toks[t], step[:1], g.round, sampled=True, logp=float(out_logp[i, c]), allowed=tab.options[s],
                   u=float(u[i, c]))
            for x in step[1:]:
                record(toks[t], [x], g.round, sampled=True, logp=0.0, allowed=[x])
            out += step
        st["pending"][r] = step                                  # the last step's tokens end with end-of-turn
        replies[(gi, p)] = chat.tok.decode([x for x in out if x != chat.eot])
    return replies

def masked_logits(logits, allowed):
    """logits (R, V) with -inf outside each row's allowed ids (R, K), -1 padded; a row of all -1 is free."""
    return torch.where(allowed_mask(allowed, logits.size(1)), logits, float("-inf"))

@dataclass
class Tables:
    """Constrained decoding compiled for the device. States 0..S-1 are the trie's decision nodes (more than one
    legal next token); FREE (free text), EOT (end-of-turn only) and DONE follow. Choosing allowed[s, k] in
    state s appends chain[s, k] (the forced tokens after it, -1 padded) and moves to next[s, k]."""
    prefix: list                 # forced tokens before the first decision (fed with the turn's text)
    start: int                   # the state after them
    allowed: torch.Tensor        # (S+3, K) long
    next: torch.Tensor           # (S+3, K) long
    chain: torch.Tensor          # (S+3, K, F) long
    chain_len: torch.Tensor      # (S+3, K) long
    depth: int                   # the most decisions on any path (sampling steps of a turn)
    options: list                # per state: its allowed ids as a list (None = free), for the Rollout
    FREE: int
    EOT: int
    DONE: int

def follow_forced(node):
    """[(token, node after it)] along the chain of single-child trie nodes starting at node."""
    chain = []
    while len(node) == 1:
        tok, node = next(iter(node.items()))
        chain.append((tok, node))
    return chain

def compile_trie(root, eot, dev):
    """A trie {token: child} (leaves are {}) -> Tables; root None compiles free text only."""
    root = root or {}
    prefix = follow_forced(root)
    first = prefix[-1][1] if prefix else root
    order, index = [], {}
    def end_of(child):                                            # the node a forced run from child stops at
        run = follow_forced(child)
        return run[-1][1] if run else child
    def visit(node):
        if node and id(node) not in index:
            index[id(node)] = len(order)
            order.append(node)
            for child in node.values():
                visit(end_of(child))
    visit(first)
    S = len(order)
    FREE, EOT, DONE = S, S + 1, S + 2
    K = max([len(n) for n in order] + [1])
    F = max([len(follow_forced(c)) for n in order for c in n.values()] + [0])
    allowed = torch.full((S + 3, K), -1, dtype=torch.long)
    nxt = torch.full((S + 3, K), DONE, dtype=torch.long)
    chain = torch.full((S + 3, K, F), -1, dtype=torch.long)
    chain_len = torch.zeros(S + 3, K, dtype=torch.long)
    for s, node in enumerate(order):
        for k, (tok, child) in enumerate(node.items()):
            run = [t for t, _ in follow_forced(child)]
            allowed[s, k], chain_len[s, k] = tok, len(run)
            chain[s, k, :len(run)] = torch.tensor(run, dtype=torch.long)
            end = end_of(child)
            nxt[s, k] = index[id(end)] if end else DONE
    nxt[FREE] = FREE
    allowed[EOT, 0] = allowed[DONE, 0] = eot
    depth = {}
    def deep(node):
        if not node:
            return 0
        if id(node) not in depth:
            depth[id(node)] = 1 + max(deep(end_of(c)) for c in node.values())
        return depth[id(node)]
    options = [list(n) for n in order] + [None, [eot], [eot]]
    return Tables(prefix=[t for t, _ in prefix], start=index[id(first)] if first else DONE, allowed=allowed.to(dev),
                  next=nxt.to(dev), chain=chain.to(dev), chain_len=chain_len.to(dev), depth=deep(first),
                  options=options, FREE=FREE, EOT=EOT, DONE=DONE)

def end_tag_table(tok, tag, dev):
    """The end tag of a message as an automaton over token ids: (len(tag) + 1, V) long, entry [q, t] = how much
    of the tag is matched after token t when q characters were (KMP over each token's text); the last
    state (all matched) is absorbing."""
    Q = len(tag)
    fail = [0] * (Q + 1)                                          # KMP failure function
    for i in range(1, Q):
        j = fail[i]
        while j and tag[i] != tag[j]:
            j = fail[j]
        fail[i + 1] = j + 1 if tag[i] == tag[j] else 0
    def step(q, ch):
        while q and tag[q] != ch:
            q = fail[q]
        return q + 1 if tag[q] == ch else 0
    V = len(tok)
    table = torch.zeros(Q + 1, V, dtype=torch.long)
    table[Q] = Q
    chars = set(tag)
    texts = tok.batch_decode([[t] for t in range(V)])
    for t, s in enumerate(texts):
        if not chars & set(s):
            continue                                              # no tag character: back to 0 from anywhere
        for q0 in range(Q):
            q = q0
            for ch in s:
                q = step(q, ch)
                if q == Q:
                    break
            table[q0, t] = q
    return table.to(dev)

def record(tr, ids, rnd, sampled=False, logp=0.0, allowed=None, u=0.0):
    tr["ids"] += ids
    tr["rnd"] += [rnd] * len(ids)
    tr["sampled"] += [sampled] * len(ids)
    tr["logp"] += [logp] * len(ids)
    tr["u"] += [u] * len(ids)
    if sampled:
        tr["allowed"].append(allowed)

def pack(toks, games, seat_policy, group_size, n_rounds, first=0):
    """Lists per trajectory -> padded tensors. first: the index of the first game (of all the processes')."""
    N, L = len(toks), max(1, max(len(t["ids"]) for t in toks))
    ids = torch.zeros(N, L, dtype=torch.long)
    mask = torch.zeros(N, L, dtype=torch.bool)
    rnd = torch.full((N, L), -1, dtype=torch.long)
    logp, u = torch.zeros(N, L), torch.zeros(N, L)
    for i, t in enumerate(toks):
        n = len(t["ids"])
        ids[i, :n] = torch.tensor(t["ids"], dtype=torch.long)
        mask[i, :n] = torch.tensor(t["sampled"], dtype=torch.bool)
        rnd[i, :n] = torch.tensor(t["rnd"], dtype=torch.long)
        logp[i, :n] = torch.tensor(t["logp"])
        u[i, :n] = torch.tensor(t["u"])
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
    T = n_rounds
    rewards = torch.tensor([[g.rewards[t][s] for t in range(T)] for g in games for s in (0, 1)], dtype=torch.float)
    invalid = torch.tensor([[g.invalid[t][s] for t in range(T)] for g in games for s in (0, 1)], dtype=torch.bool)
    game = first + torch.arange(N) // 2
    return Rollout(ids=ids, length=torch.tensor([len(t["ids"]) for t in toks]), action_mask=mask, token_round=rnd,
                   sampler_logp=logp, sampler_u=u, allowed=allowed, decision=decision, rewards=rewards, invalid=invalid, game=game,
                   group=game // group_size, seat=torch.arange(N) % 2,
                   policy=torch.tensor([int(seat_policy[g][s]) for g in range(len(games)) for s in (0, 1)]),
                   games=games)

def cooperation(ro):
    """IPD: (N, T) bool, True where trajectory i cooperated in round t (rows as in the Rollout)."""
    return torch.tensor([[i["moves"][s] == "A" for i in g.info] for g in ro.games for s in (0, 1)])

def claims(ro, env):
    """Split/TAS: what each trajectory claimed, by situation -> (N, K, 2) sum and count over its rounds, K as in
    envs.CLAIMS[env] (envs.round_claims). Welfare-max Split keeps 10 / 5 / 0, greedy 10 / 10 / 10; in TAS honest
    claims 10 / 0 and names its hand (1), greedy claims 10 / 10 and does not (0)."""
    out = torch.zeros(2 * len(ro.games), len(envs.CLAIMS[env]), 2)
    for gi, g in enumerate(ro.games):
        for p in (0, 1):
            for info in g.info:
                for k, v in envs.round_claims(env, info, p):
                    out[2 * gi + p, k] += torch.tensor([v, 1.0])
    return out

def claim_means(x, env):
    """claims() of the rows to average, summed over rows first: (K, 2) -> {key: mean} (keys never seen left out)."""
    return {k: (s / n).item() for k, (s, n) in zip(envs.CLAIMS[env], x) if n > 0}

# -----------------------------------------------------------------------------
# exact action probabilities (the memory-one readout of SPEC 4)

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
        g = envs.make_game("ipd", 0, 2)
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
    model = pol.model
    dev = model.lm_head.weight.device
    L = max(len(c) for c in convs)
    idx = torch.zeros(len(convs), L, dtype=torch.long, device=dev)
    for i, c in enumerate(convs):
        idx[i, :len(c)] = torch.tensor(c)
    h = model.hidden(idx)[torch.arange(len(convs)), torch.tensor([len(c) - 1 for c in convs])]
    logits = model.lm_head(h).float()[:, [a_ids[k], b_ids[k]]]          # (5, 2): renormalized over the legal options
    return dict(zip(MEMORY_ONE, torch.softmax(logits, -1)[:, 0].tolist()))
