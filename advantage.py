"""
advantage.py: returns, the group-relative (leave-one-out) baseline, and the credits each algorithm gives
to a round's actions: naive, sum-of-rewards, and Advantage Alignment. Pure tensor functions.

    python advantage.py        # tabular memory-one IPD learners: naive -> defection, AA -> reciprocity

Shapes: B trajectories (one player's side of one game), T rounds.
"""
import torch

# -----------------------------------------------------------------------------
# ALGO LOGIC

def discounted_returns(rewards, gamma):
    """rewards (B, T) -> G (B, T), G_t = sum_{k>=t} gamma^(k-t) r_k. No bootstrap: games end."""
    G = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        G[:, t] = running
    return G

def loo_baseline(G, group, player):
    """Leave-one-out baseline. G (B, T); group, player (B,) int ids. Each trajectory's baseline is the mean
    G_t of the *other* trajectories with the same group (shared environment seed) and the same player id.
    A trajectory alone in its group falls back to the other trajectories of its player id in the whole
    batch (what the released code does with groups of 1); alone in the batch, its baseline is 0.
    Different player ids never share a baseline. Where every trajectory of a pool has the same G_t, the
    baseline is G_t itself, so the advantage is exactly 0 (not float noise of ~1e-7 that Adam would turn into
    a full step). Returns the baseline (B, T); no whitening."""
    def loo(key):
        _, inv = torch.unique(key, return_inverse=True)
        K, idx = int(inv.max()) + 1, inv[:, None].expand_as(G)
        sums = torch.zeros(K, G.size(1), dtype=G.dtype).index_add_(0, inv, G)                      # (K, T)
        n = torch.bincount(inv).to(G.dtype)[inv][:, None]                                          # (B, 1)
        hi = torch.full((K, G.size(1)), -torch.inf, dtype=G.dtype).scatter_reduce(0, idx, G, "amax")
        lo = torch.full((K, G.size(1)), torch.inf, dtype=G.dtype).scatter_reduce(0, idx, G, "amin")
        base = torch.where((hi[inv] == lo[inv]) & (n > 1), G, (sums[inv] - G) / (n - 1).clamp(min=1))
        return base, n > 1
    n_players = int(player.max()) + 1
    in_group, ok_group = loo(group * n_players + player)
    in_batch, ok_batch = loo(player)
    return torch.where(ok_group, in_group, torch.where(ok_batch, in_batch, torch.zeros_like(G)))

def advantages(rewards, gamma, group, player, reward_scale=1.0):
    """rewards (B, T) -> A (B, T) = scaled discounted return minus the leave-one-out baseline."""
    G = discounted_returns(rewards * reward_scale, gamma)
    return G - loo_baseline(G, group, player)

def discount_matrix(T, gamma, include_now):
    """(T, T) matrix W with W[t, k] = gamma^(t-k) for k < t (or k <= t), else 0."""
    t = torch.arange(T)
    diff = (t[:, None] - t[None, :]).double()
    keep = diff >= 0 if include_now else diff > 0
    return torch.where(keep, gamma ** diff.clamp(min=0), torch.zeros(()).double())

def aa_credits(a1, a2, beta, gamma, jit=False):
    """Advantage Alignment. a1 (B, T) own advantages, a2 (B, T) the opponent's in the same game.
    released: C_t = a1_t + beta * gamma * (sum_{k<t} gamma^(t-k) a1_k) * a2_t
    jit:      C_t = a1_t + beta * (sum_{k<=t} gamma^(t-k) a1_k) * a2_t
    My past advantages times the opponent's current one: I am pushed to take actions that made the
    opponent's good outcomes likely after my good ones (reciprocity), and away from exploiting it."""
    W = discount_matrix(a1.size(1), gamma, include_now=jit).to(a1.dtype)   # (T, T)
    weight = a1 @ W.T                                                          # (B, T)
    if not jit:
        weight = gamma * weight
    return a1 + beta * weight * a2

def credits(algo, a1, a2, beta=0.0, gamma=0.9, jit=False):
    """(B, T) per-round credit for every trajectory. algo: naive | sum | adalign."""
    if algo == "naive":
        return a1
    if algo == "sum":     # the cooperative oracle: maximize both players' returns
        return a1 + a2
    if algo == "adalign":
        return aa_credits(a1, a2, beta, gamma, jit)
    raise ValueError(f"unknown algo {algo!r}: choose naive, sum or adalign")

# -----------------------------------------------------------------------------
# demonstration: tabular memory-one policies in the IPD

def play_ipd(logits, n_games, n_rounds, gen):
    """Two memory-one policies (logits (2, 5): P(C) logit at opening, after CC, CD, DC, DD from each
    player's own view). -> log-probs of the taken actions (2, n, T), rewards (2, n, T), cooperations."""
    payoff = torch.tensor([[3.0, 0.0], [5.0, 1.0]])          # [my move, their move], 0 = C, 1 = D
    state = torch.zeros(2, n_games, dtype=torch.long)         # 0 = opening
    logps, rewards, coop = [], [], []
    for _ in range(n_rounds):
        p_c = torch.sigmoid(logits.gather(1, state))          # (2, n)
        d = (torch.rand(2, n_games, generator=gen) >= p_c).long()  # 1 = defect
        logps.append(torch.where(d == 0, p_c, 1 - p_c).log())
        rewards.append(payoff[d, d.flip(0)])
        coop.append(1.0 - d.float())
        state = 1 + 2 * d + d.flip(0)                         # CC=1, CD=2, DC=3, DD=4
    return torch.stack(logps, -1), torch.stack(rewards, -1), torch.stack(coop, -1)

def train_tabular(algo, iters=200, n_games=128, n_rounds=10, lr=0.1, beta=0.5, gamma=0.9, seed=0, log_every=0):
    """Two independent memory-one learners trained with these credit functions. -> P(C) (2, 5), coop rate."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.zeros(2, 5, requires_grad=True)            # P(C) = 0.5 everywhere at the start
    opt = torch.optim.Adam([logits], lr=lr)
    group = torch.arange(n_games)                             # IPD: no env randomness, groups of 1
    for it in range(iters + 1):
        logp, r, coop = play_ipd(logits, n_games, n_rounds, gen)
        A = torch.stack([advantages(r[i], gamma, group, torch.zeros(n_games, dtype=torch.long), 1 / 5)
                         for i in (0, 1)])                    # (2, n, T), each player its own baseline
        C = torch.stack([credits(algo, A[i], A[1 - i], beta, gamma) for i in (0, 1)])
        if log_every and it % log_every == 0:
            print(f"  {it:4d}  coop {coop.mean():.2f}  P(C) " + fmt(torch.sigmoid(logits[0])))
        if it == iters:
            break
        opt.zero_grad()
        (-(C.detach() * logp).mean()).backward()
        opt.step()
    return torch.sigmoid(logits.detach()), coop.mean().item()

def fmt(p):
    return "(" + ", ".join(f"{x:.2f}" for x in p.tolist()) + ")  [open, CC, CD, DC, DD]"

if __name__ == "__main__":
    import sys, time
    t0 = time.time()
    if len(sys.argv) > 1:                                     # python advantage.py 0 0.1 0.5 1: a beta sweep
        try:
            betas = [float(b) for b in sys.argv[1:]]
        except ValueError:
            sys.exit("usage: python advantage.py [beta ...]   (no arguments: the naive vs AA demo)")
        print("AA beta sweep, 3 seeds each: cooperation and player 0's P(C)")
        for beta in betas:
            for seed in range(3):
                p, coop = train_tabular("adalign", beta=beta, seed=seed)
                print(f"  beta {beta:g} seed {seed}: coop {coop:.2f}  P(C) " + fmt(p[0]))
        print(f"({time.time() - t0:.1f} s)")
        sys.exit()
    for algo, beta in (("naive", 0.0), ("adalign", 0.5)):
        print(f"\n{algo} (beta {beta}, gamma 0.9, 128 games x 10 rounds, Adam lr 0.1), player 0's P(cooperate):")
        p, coop = train_tabular(algo, beta=beta, log_every=25)
        print(f"  end: coop {coop:.2f}; player 1 " + fmt(p[1]))
    print(f"\n({time.time() - t0:.1f} s) Reciprocity = high P(C) after CC, low after CD; always-defect = all low.")
