"""Which way does each algorithm's credit push a Split proposal? (README, "Split: ... the sum-of-rewards arm")

    python results/split_credit_check.py            # base model, 6 rollouts of 8 games (one group each), ~10 min on 2 CPU cores

For every (trajectory, round) of rollouts of the untrained embedded model in self-play (bf16 autocast, as
the Split runs), the per-round credit that train.py would give (naive, sum, adalign; Split's defaults)
against what the proposal kept: the mean units of the items worth less to the player than to the other,
of the items worth more, and of all three. The policy gradient raises a proposal's log-probability in
proportion to its credit, so a positive correlation means the update pushes that quantity up."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train                                   # noqa: E402
from model import load_model                   # noqa: E402
from rollout import LMPolicy, rollout          # noqa: E402

ALGOS = ("naive", "sum", "adalign")

def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12)).item()

def main(n_rollouts=6, n_games=8):
    model, tok = load_model("smollm2-135m")
    pol, rows = LMPolicy(model, tok), []
    trained = torch.ones(2 * n_games, dtype=torch.bool)
    for rep in range(n_rollouts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ro = rollout("split", [pol], torch.zeros(n_games, 2, dtype=torch.long), n_games, seed=1000 + rep,
                         group_size=n_games)
        C = {a: train.compute_credits(ro.rewards, trained, dict(group_size=n_games, gamma=0.9, reward_scale=0.01,
                                                               beta=1.0, jit=False, algo=a))[0] for a in ALGOS}
        for gi, g in enumerate(ro.games):
            for p in (0, 1):
                for t, info in enumerate(g.info):
                    mine, theirs, kept = info["values"][p], info["values"][1 - p], info["claims"][p]
                    less = [k for m, o, k in zip(mine, theirs, kept) if m < o]   # every profile has one of each
                    more = [k for m, o, k in zip(mine, theirs, kept) if m > o]
                    rows.append([sum(less) / len(less), sum(more) / len(more), sum(kept) / 3]
                                + [C[a][2 * gi + p, t].item() for a in ALGOS])
    X = torch.tensor(rows)                                               # (n, 3 + len(ALGOS))
    print(f"{len(rows)} (trajectory, round) pairs of the base model; mean units kept of an item worth less "
          f"{X[:, 0].mean():.2f}, worth more {X[:, 1].mean():.2f}; their correlation within a proposal "
          f"{corr(X[:, 0], X[:, 1]):+.3f}")
    print("| credit | corr with units kept of items worth less | worth more | all three |\n|---|---|---|---|")
    for j, a in enumerate(ALGOS):
        print(f"| {a} | {corr(X[:, 3 + j], X[:, 0]):+.3f} | {corr(X[:, 3 + j], X[:, 1]):+.3f} | "
              f"{corr(X[:, 3 + j], X[:, 2]):+.3f} |")

if __name__ == "__main__":
    main()
