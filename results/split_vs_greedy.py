"""How far above the greedy strategy is a Split run's welfare, on the same value draws? (results/README.md: Split)

    python results/split_vs_greedy.py results/split_*_bf16_seed0_log.jsonl          # a few seconds
    python results/split_vs_greedy.py --seed 1 results/split_*_bf16_seed1_log.jsonl

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rollout import FixedPolicy, rollout    # noqa: E402

def welfare(strategy, seed, it, n_games=8, group_size=8):
    """Welfare per round of `strategy` in self-play on the games of iteration `it` of a train.py run."""
    ro = rollout("split", [FixedPolicy("split", strategy)], torch.zeros(n_games, 2, dtype=torch.long), n_games,
                 seed=seed * 1_000_003 + it, group_size=group_size)
    return (ro.rewards[0::2] + ro.rewards[1::2]).mean().item()

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl files of Split runs with the same seed and games")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_games", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--block", type=int, default=10, help="iterations per block")
    a = p.parse_args()
    if a.n_games < 1 or a.group_size < 1 or a.block < 1:
        sys.exit("error: --n_games, --group_size and --block must be positive")
    cache = {}
    for f in a.logs:
        try:
            log = [json.loads(line) for line in open(f)]
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: {f}: {e}")
        gap, share, gain = [], [], []
        for r in log:
            if r["iter"] not in cache:
                cache[r["iter"]] = [welfare(k, a.seed, r["iter"], a.n_games, a.group_size) for k in ("greedy", "welfare_max")]
            g, w = cache[r["iter"]]
            gap.append(r["welfare"] - g)
            gain.append(w - g)
            share.append(gap[-1] / gain[-1])
        blocks = lambda x, fmt: " ".join(format(sum(x[i:i + a.block]) / len(x[i:i + a.block]), fmt)
                                         for i in range(0, len(x), a.block))
        print(f"{f}: {len(log)} iterations; blocks of {a.block}: welfare - greedy's {blocks(gap, '+.1f')} | "
              f"share of welfare-max's gain {blocks(share, '+.3f')} (that gain: {min(gain):.1f} to {max(gain):.1f})")

if __name__ == "__main__":
    main()
