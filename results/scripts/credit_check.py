"""Which way does each algorithm's credit push a proposal? (results/split.md: Split's sum-of-rewards arm; results/tas.md)

    python results/scripts/credit_check.py                  # split: ~10 min on 2 CPU cores (beside two training runs)
    python results/scripts/credit_check.py --env tas        # tas: ~15 min (the same)

The untrained embedded model plays itself (6 rollouts of 8 games in one group each, bf16 autocast as the
runs). For every (trajectory, round): the per-round credit that train.py gives (naive, sum, adalign; the
env's defaults) against what the player did in that round. Split: the units it claimed of the item worth
less to it than to the other, of the item worth more, and of all three. TAS: the coins it claimed when it
held the upper hand, when it held the lower hand, and whether its message named its own hand. The policy
gradient raises the log-probability of a round's tokens in proportion to the round's credit, so a
positive correlation means the update pushes that quantity up.

Split also gets the game's own arithmetic on the same proposals, with no credit noise: how much one more unit
claimed changes the round's welfare (what the myopic cooperative credit, --algo sum with gamma near 0, pushes
on), by the item's worth to the player and by whether the two claims on it still fit in 10 units (then the
unit was unclaimed and the welfare gains its value to the player) or are shared in proportion."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import envs                                    # noqa: E402
import train                                   # noqa: E402
from load import load_model                   # noqa: E402
from envs import GAMES                                 # noqa: E402
from rollout import LMPolicy, rollout                  # noqa: E402

ALGOS = ("naive", "sum", "adalign")
COLUMNS = {"split": ("units claimed of the item worth less to the player", "worth more", "all three (mean)"),
           "tas": ("coins claimed with the upper hand", "with the lower hand", "message names the own hand")}

def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12)).item()

def features(env, info, p):
    """What player p did in one round -> 3 numbers (nan where the situation did not occur)."""
    by_k = {}
    for k, v in GAMES[env].round_readout(info, p):
        by_k.setdefault(k, []).append(v)
    mean = {k: sum(v) / len(v) for k, v in by_k.items()}
    if env == "split":                                  # less (k 2), more (k 0), all three
        return [mean[2], mean[0], sum(info["claims"][p]) / 3]
    return [mean.get(k, float("nan")) for k in range(3)]

def main(env="split", n_rollouts=6, n_games=8):
    d = train.resolve(dict({k: getattr(train, k) for k in train.CONFIG_KEYS}, env=env))
    model, tok = load_model("smollm2-135m")
    pol, rows = LMPolicy(model, tok), []
    trained = torch.ones(2 * n_games, dtype=torch.bool)
    margins = []                                                         # Split: (k, fits, dW) per item
    for rep in range(n_rollouts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ro = rollout(env, [pol], torch.zeros(n_games, 2, dtype=torch.long), n_games, seed=1000 + rep,
                         group_size=n_games, max_msg_tokens=d["max_msg_tokens"])
        C = {a: train.compute_credits(ro.rewards, trained, dict(d, group_size=n_games, algo=a))[0] for a in ALGOS}
        for gi, g in enumerate(ro.games):
            for p in (0, 1):
                for t, info in enumerate(g.info):
                    rows.append(features(env, info, p) + [C[a][2 * gi + p, t].item() for a in ALGOS])
                    if env == "split":
                        margins += marginal_welfare(info, p)
    X = torch.tensor(rows)                                               # (n, 3 + len(ALGOS))
    print(f"{len(rows)} (trajectory, round) pairs of the base model in {env}; means: " +
          ", ".join(f"{name} {X[:, j].nanmean():.2f}" for j, name in enumerate(COLUMNS[env])))
    print(f"| credit | corr with {COLUMNS[env][0]} | {COLUMNS[env][1]} | {COLUMNS[env][2]} |\n|---|---|---|---|")
    for j, a in enumerate(ALGOS):
        cells = []
        for k in range(3):
            ok = ~X[:, k].isnan()
            cells.append(f"{corr(X[ok, 3 + j], X[ok, k]):+.3f}")
        print(f"| {a} | " + " | ".join(cells) + " |")

    if margins:
        print_margins(margins)

def marginal_welfare(info, p):
    """Split, one round: for each item player p claimed fewer than 10 units of, the welfare change of claiming one
    more (the other's claim fixed) -> [(k: 0 worth more to p / 1 as much / 2 less, fits: the claims then still
    sum to 10 or less, dW)]."""
    out = []
    for (k, a), mine, theirs, b in zip(GAMES["split"].round_readout(info, p), info["values"][p], info["values"][1 - p],
                                       info["claims"][1 - p]):                   # k: round_readout's situation
        if a < 10:
            w = lambda x: sum(g * v for g, v in zip(envs.proportional(x, b), (mine, theirs)))
            out.append((k, a + 1 + b <= 10, w(a + 1) - w(a)))
    return out

def print_margins(margins):
    M = torch.tensor(margins, dtype=torch.float)                         # (n, 3): k, fits, dW
    print(f"\nSplit: welfare change of one more unit claimed ({len(M)} (player, round, item) cases below 10 units; "
          "per case, and its share of all cases)")
    print("| item worth | all | claims fit in 10 (unclaimed units) | shared in proportion |\n|---|---|---|---|")
    for k, name in enumerate(("more to the player", "as much", "less")):
        cells = []
        for sel in (M[:, 0] == k, (M[:, 0] == k) & (M[:, 1] == 1), (M[:, 0] == k) & (M[:, 1] == 0)):
            cells.append(f"{M[sel, 2].mean():+.2f} ({sel.float().mean():.0%})" if sel.any() else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"| every item | {M[:, 2].mean():+.2f} | {M[M[:, 1] == 1, 2].mean():+.2f} | {M[M[:, 1] == 0, 2].mean():+.2f} |")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="split", choices=("split", "tas"))
    main(ap.parse_args().env)
