"""
engine.py: the fast decoder behind rollout.py. It samples exactly what rollout.plain_reply samples (the tests
check it token for token), but for every acting seat of one policy at once and without recomputing the past:

- each seat's conversation is one row of a persistent KV cache, fed only its new text each turn; the system
  prompt and intro, the same for every row, are computed once and copied;
- the valid actions, a token trie, are compiled to integer tables (Tables: allowed tokens, next state, the
  forced run after a choice), and a message's end tag to an automaton over token ids, so every row's state
  is a tensor on the model's device and one decode step is the same tensor program for all rows;
- the host reads the results once per turn; with cuda_graph, a long turn's step has fixed shapes and buffers
  (TurnState), so a GPU captures it once as a CUDA graph and replays it.

    seats = Seats(policy, trajectories, shared_ids, cuda_graph)     # one per LM policy per rollout
    replies = seats.turn(trajectories, chunks, trie, u, temperature, budget, free)
"""
from dataclasses import dataclass

import torch

import envs
from model import KVCache, cache_dtype, masked_logits, sample

# -----------------------------------------------------------------------------
# one policy's seats in one rollout

class Seats:
    """The seats one LM policy plays in a rollout, one KV cache row each. `traj` names them (trajectory ids)."""
    def __init__(self, pol, traj, shared, cuda_graph=False):
        m = pol.model
        self.pol, self.shared, self.row = pol, shared, {t: r for r, t in enumerate(traj)}
        self.cache = KVCache(m.cfg, len(traj), 256, m.lm_head.weight.device, cache_dtype(m))
        self.pending = [[] for _ in traj]        # each row's tokens sampled last turn, fed with its next text
        self.graphs = {} if cuda_graph else None  # decode's TurnStates (and CUDA graphs) by shape
        self.sub = None                           # the cache copy a turn of some rows decodes in

    def turn(self, traj, chunks, trie, u, temperature, budget, free):
        """One turn of the acting seats traj: feed each its new tokens (chunks, the action's forced start
        included), decode until every one ended its reply. trie: the valid replies (rollout's LMPolicy.trie);
        u (steps, len(traj)): the turn's uniforms; free: a message (free text, ended by its end tag or
        the budget). -> per seat, its reply's tokens [(token, logp, allowed ids or None, u)] as plain_reply's."""
        tab = tables(self.pol, trie)
        end_tag = end_tag_automaton(self.pol) if free else None
        rows = [self.row[t] for t in traj]
        idx, lengths = self.feed(rows, chunks)
        cache, R = self.cache, len(self.row)
        room = idx.size(1) + u.size(0) * (1 + tab.chain.size(2))   # the most slots the turn adds: it never grows mid-turn
        cache.reserve(room)
        if len(rows) == R:                       # every row acts (IPD, Split, proposals): decode in place
            u_rows = torch.zeros(u.size(0), R)
            u_rows[:, rows] = u
            ts = decode(self.pol, cache, tab, idx, lengths, rows, u_rows, temperature, budget, end_tag, self.graphs)
            cols, u = rows, u_rows
        else:                                    # some rows act (a TAS message): decode a copy of them, write it back
            sel = torch.tensor(rows, device=idx.device)
            self.sub = sub = cache.take(sel, room, self.sub)
            ts = decode(self.pol, sub, tab, idx[sel], lengths[sel], range(len(rows)), u, temperature, budget,
                        end_tag, self.graphs)
            cache.put(sel, sub)
            cols = range(len(rows))
        return self.read(tab, rows, cols, ts, u)

    def feed(self, rows, chunks):
        """The acting rows' new tokens after what they sampled last turn (not yet in the cache), as one ragged
        chunk for the model: idx (R, T) and lengths (R,) on its device (0 for rows that do not act)."""
        cache = self.cache
        dev = cache.k.device
        if cache.span == 0:  # the system prompt and intro are the same for all rows: compute them once, copy
            P = len(self.shared)
            one = KVCache(self.pol.model.cfg, 1, P, dev, cache.k.dtype)
            self.pol.model.extend(one, torch.tensor([self.shared], device=dev), torch.tensor([P], device=dev))
            cache.start([(one.k[:, 0], one.v[:, 0])] * cache.k.size(1))
        full = [[] for _ in self.row]
        for r, c in zip(rows, chunks):
            full[r], self.pending[r] = self.pending[r] + c, []
        idx = torch.nn.utils.rnn.pad_sequence([torch.tensor(c, dtype=torch.long) for c in full], batch_first=True)
        return idx.to(dev), torch.tensor([len(c) for c in full], device=dev)

    def read(self, tab, rows, cols, ts, u):
        """One read of the turn's buffers: each acting row's tokens (a sampled one with its log-prob, the allowed
        set of its state and its uniform; a forced one with log-prob 0), the last step's kept to be fed with the
        row's next text. rows: the acting rows; cols: their columns in the buffers."""
        out_tok, out_logp, out_state = ts.tok.cpu(), ts.logp.cpu(), ts.sampled_in.cpu()
        replies = []
        for r, c in zip(rows, cols):
            out = []
            for i in range(out_state.size(0)):
                s = int(out_state[i, c])
                if s == tab.DONE:
                    break
                step = [x for x in out_tok[i, c].tolist() if x >= 0]
                out.append((step[0], float(out_logp[i, c]), tab.options[s], float(u[i, c])))
                out += [(x, 0.0, [x], 0.0) for x in step[1:]]
            self.pending[r] = step                 # the last step's tokens end with end-of-turn
            replies.append(out)
        return replies

def tables(pol, trie):
    """The policy's trie compiled for its device, once (tries live as long as their policy: id() is a key)."""
    if id(trie) not in pol.compiled:
        pol.compiled[id(trie)] = compile_trie(trie, pol.chat.eot, pol.model.lm_head.weight.device)
    return pol.compiled[id(trie)]

END_TAGS = {}   # (tokenizer, vocabulary size, device) -> end-tag automaton

def end_tag_automaton(pol):
    """The automaton that finds a message's end tag in free text (built once per tokenizer, a few seconds)."""
    dev = pol.model.lm_head.weight.device
    key = (pol.tok.name_or_path, len(pol.tok), str(dev))
    if key not in END_TAGS:
        END_TAGS[key] = end_tag_table(pol.tok, envs.MESSAGE_END, dev)
    return END_TAGS[key]

# -----------------------------------------------------------------------------
# the decode loop: row states in tensors, a fixed-shape step, CUDA graphs

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
    The cache already has room for the turn (Seats.turn). u (steps, R): the uniforms of each step.
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


# -----------------------------------------------------------------------------
# constrained decoding compiled: trie -> tables, end tag -> automaton

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
    options: list                # per state: its allowed ids as a list (None = free), for the Rollout
    FREE: int
    EOT: int
    DONE: int

def forced_run(node):
    """-> (the tokens forced from node on, i.e. along single-child trie nodes; the node where a choice comes)."""
    run = []
    while len(node) == 1:
        t, node = next(iter(node.items()))
        run.append(t)
    return run, node

def compile_trie(root, eot, dev):
    """A trie {token: child} (leaves are {}) -> Tables; root {} compiles free text only."""
    prefix, first = forced_run(root)
    order, index = [], {}
    def visit(node):
        if node and id(node) not in index:
            index[id(node)] = len(order)
            order.append(node)
            for child in node.values():
                visit(forced_run(child)[1])
    visit(first)
    S = len(order)
    FREE, EOT, DONE = S, S + 1, S + 2
    K = max([len(n) for n in order] + [1])
    F = max([len(forced_run(c)[0]) for n in order for c in n.values()] + [0])
    allowed = torch.full((S + 3, K), -1, dtype=torch.long)
    nxt = torch.full((S + 3, K), DONE, dtype=torch.long)
    chain = torch.full((S + 3, K, F), -1, dtype=torch.long)
    chain_len = torch.zeros(S + 3, K, dtype=torch.long)
    for s, node in enumerate(order):
        for k, (tok, child) in enumerate(node.items()):
            run, end = forced_run(child)
            allowed[s, k], chain_len[s, k] = tok, len(run)
            chain[s, k, :len(run)] = torch.tensor(run, dtype=torch.long)
            nxt[s, k] = index[id(end)] if end else DONE
    nxt[FREE] = FREE
    allowed[EOT, 0] = allowed[DONE, 0] = eot
    options = [list(n) for n in order] + [None, [eot], [eot]]
    return Tables(prefix=prefix, start=index[id(first)] if first else DONE, allowed=allowed.to(dev),
                  next=nxt.to(dev), chain=chain.to(dev), chain_len=chain_len.to(dev),
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
