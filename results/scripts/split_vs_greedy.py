"""How far above the greedy strategy is a Split run's welfare, on the same value draws? (results/split.md)

    python results/scripts/split_vs_greedy.py out/log.jsonl                                 # a run of train.py's defaults
    python results/scripts/split_vs_greedy.py --n_games 8 results/logs/split_*_bf16_seed0_log.jsonl   # runs of 8 games (a few seconds)
    python results/scripts/split_vs_greedy.py --n_games 8 --seed 1 results/logs/split_*_bf16_seed1_log.jsonl
    python results/scripts/split_vs_greedy.py --seed 0,1 --plot gap.png A_seed0_log.jsonl A_seed1_log.jsonl   # a seed per log

A Split iteration's welfare moves with its value draws (all games of a group share them): greedy against
greedy scores 147 to 183 per round on different iterations of seed 0, so a raw curve shows the draws more than
the learning. For every log line, this replays the iteration's games (train.py's seeds: --seed, --n_games,
--group_size as the run had them) with both seats played by a fixed strategy, and prints the run's welfare
minus greedy's, and that gap as a share of welfare-max's gap over greedy (0: greedy, 1: welfare-max), in
blocks of iterations."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train                               # noqa: E402
from rollout import FixedPolicy, rollout    # noqa: E402

def welfare(strategy, seed, it, n_games, group_size):
    """Welfare per round of `strategy` in self-play on the games of iteration `it` of a train.py run."""
    ro = rollout("split", [FixedPolicy("split", strategy)], torch.zeros(n_games, 2, dtype=torch.long), n_games,
                 seed=seed * 1_000_003 + it, group_size=group_size)
    return (ro.rewards[0::2] + ro.rewards[1::2]).mean().item()

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl files of Split runs with the same seed and games")
    p.add_argument("--seed", default="0", help="train.py's --seed: one for all logs, or one per log (0,1,2)")
    p.add_argument("--n_games", type=int, default=0, help="the run's; 0: train.py's default (8 before 2026-11-28)")
    p.add_argument("--group_size", type=int, default=0, help="the run's; 0: train.py's default")
    p.add_argument("--block", type=int, default=10, help="iterations per block")
    p.add_argument("--plot", metavar="PNG", help="also draw each log's welfare minus greedy's per iteration")
    a = p.parse_args()
    try:
        a.seed = [int(x) for x in a.seed.split(",")]
    except ValueError:
        sys.exit(f"error: --seed {a.seed!r}: give integers separated by commas")
    if len(a.seed) not in (1, len(a.logs)):
        sys.exit(f"error: --seed takes one seed or one per log ({len(a.logs)}), not {len(a.seed)}")
    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("error: --plot needs matplotlib (pip install matplotlib)")
        fig, ax = plt.subplots(figsize=(8, 4.5))
    if a.block < 1:
        sys.exit("error: --block must be positive")
    run = train.resolve({k: getattr(train, k) for k in train.CONFIG_KEYS}       # train.py's games and groups
                        | {"env": "split", "n_games": a.n_games, "group_size": a.group_size})
    a.n_games, a.group_size = run["n_games"], run["group_size"]
    cache = {}
    for f, seed in zip(a.logs, a.seed * len(a.logs) if len(a.seed) == 1 else a.seed):
        try:
            log = [json.loads(line) for line in open(f)]
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: {f}: {e}")
        gap, share, gain = [], [], []
        for r in log:
            if (seed, r["iter"]) not in cache:
                cache[seed, r["iter"]] = [welfare(k, seed, r["iter"], a.n_games, a.group_size)
                                          for k in ("greedy", "welfare_max")]
            g, w = cache[seed, r["iter"]]
            gap.append(r["welfare"] - g)
            gain.append(w - g)
            share.append(gap[-1] / gain[-1])
        blocks = lambda x, fmt: " ".join(format(sum(x[i:i + a.block]) / len(x[i:i + a.block]), fmt)
                                         for i in range(0, len(x), a.block))
        print(f"{f}: {len(log)} iterations; blocks of {a.block}: welfare - greedy's {blocks(gap, '+.1f')} | "
              f"share of welfare-max's gain {blocks(share, '+.3f')} (that gain: {min(gain):.1f} to {max(gain):.1f})")
        if a.plot:
            ax.plot([r["iter"] for r in log], gap, marker=".", label=f"{os.path.basename(f)} (seed {seed})")
    if a.plot:
        ax.axhline(0, color="gray", lw=0.8)
        ax.text(0, 1, " greedy", color="gray", va="bottom")
        top = sum(w - g for g, w in cache.values()) / len(cache)                 # welfare-max's gap, mean over draws
        ax.axhline(top, color="gray", lw=0.8, ls="--")
        ax.text(0, top - 1, f" welfare-max (+{top:.0f}, mean)", color="gray", va="top")
        ax.set_xlabel("iteration"); ax.set_ylabel("welfare per round minus greedy's, same draws")
        ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(a.plot, dpi=110)
        print(f"wrote {a.plot}")

if __name__ == "__main__":
    main()
