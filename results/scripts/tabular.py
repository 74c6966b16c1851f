"""Split and Trust-and-Split with tabular learners: is it the method or the model? (results/tabular.md: "Is it the method or the model?")

    python results/scripts/tabular.py --env split                        # naive, sum, AA; 3 seeds each; ~40 s on 1 CPU core
    python results/scripts/tabular.py --env split --start_p10 0 0.65 0.9 # also from near-greedy starts
    python results/scripts/tabular.py --env tas                          # with messages; --env tas_silent: without them
    python results/scripts/tabular.py --env tas --start_truthful 0.9     # messages that start out naming the own hand
    python results/scripts/tabular.py --env split --algos adalign --beta 0 0.5 1 2

As `python advantage.py` does for the IPD: two independent tabular learners play the game with exactly the
credit functions train.py uses (advantage.advantages over groups of 8 games that share the environment's
draws, advantage.credits; the env's defaults for beta, gamma and the reward scale), Adam on softmax tables.
A round's log-prob is the sum over everything the learner chose in it, as the LLM's tokens share a round's credit.

Split: one claim (0-10) per item, from a table indexed by (memory, situation): the item is worth more to me than
to the other / as much / less, and the memory of the last round is the opening, "the other was fair" (it claimed
at most 5 of the item worth more to me) or "greedy". Welfare-max (10 / 5 / 0) gives 255 per round on average,
greedy (10 of all) 165; claiming 10 is dominant in one round, so this is a social dilemma like the IPD.
TAS: a message naming a hand (rock, paper or scissors) from a table indexed by the own hand, then a claim (0-10
coins) indexed by (memory, own hand, the other's message); the memory: the opening, "fair" (last round the other
held the lower hand and claimed at most 5, or held the upper hand), "greedy". Honest cooperators (truthful
messages; the upper hand claims 10, the lower 0) get 100 per round, both claiming everything 55. tas_silent: no
messages (the claim table is indexed by (memory, own hand)), where nothing tells a player which hand wins. The TAS
readout is the mean claim with the upper and with the lower hand in the last iteration's games, whatever code the
messages use, and P(message = own hand).

All tables start at 0 (uniform choices), or with --start_p10 P claiming 10 with probability P in every state (the
other claims share the rest): closer to the LLM, whose first claims are high whatever the values or hands."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import advantage                      # noqa: E402
import envs                           # noqa: E402

PROFILES = torch.tensor(envs.Split.PROFILES, dtype=torch.float)   # (12, 2, 3): player 0's and 1's unit values
HAND_PAIRS = torch.tensor([(a, b) for a in range(3) for b in range(3) if a != b])   # (6, 2); 0 rock 1 paper 2 scissors
BEATEN = torch.tensor([envs.HANDS.index(envs.BEATS[h]) for h in envs.HANDS])   # (3,): the hand each hand beats

def shares(c0, c1):
    """Claims on 10 units (any shape) -> units each gets: its claim if the two fit in 10, else in proportion."""
    fit = c0 + c1 <= 10
    tot = (c0 + c1).clamp(min=1)
    return torch.where(fit, c0, 10 * c0 / tot), torch.where(fit, c1, 10 * c1 / tot)

def draw(probs, gen):
    """probs (..., K) -> sampled indices (...), and their log-probs (...)."""
    x = torch.multinomial(probs.reshape(-1, probs.size(-1)).detach(), 1, generator=gen).view(probs.shape[:-1])
    return x, probs.gather(-1, x[..., None]).squeeze(-1).log()

def play_split(tables, n, group_size, gen):
    """One round for n games. tables {"claim": (2, 3 memories, 3 situations, 11)}, memory (2, n) in tables["mem"].
    -> log-prob (2, n), rewards (2, n)."""
    vals = PROFILES[torch.randint(len(PROFILES), (n // group_size,), generator=gen).repeat_interleave(group_size)]
    vals = vals.transpose(0, 1)                                                          # (2, n, 3)
    situation = torch.where(vals > vals.flip(0), 0, torch.where(vals == vals.flip(0), 1, 2))   # (2, n, 3)
    mem = tables["mem"]
    c, logp = draw(tables["claim"][torch.arange(2)[:, None, None], mem[:, :, None], situation].softmax(-1), gen)
    got = torch.stack(shares(c[0].float(), c[1].float()))                               # (2, n, 3)
    other_on_mine = (c.flip(0) * (situation == 0)).sum(-1)         # what the other claimed of my more-valued item
    tables["mem"] = 1 + (other_on_mine > 5).long()
    return logp.sum(-1), (got * vals).sum(-1)

def play_tas(tables, n, group_size, gen):
    """One round of TAS (tables["msg"] (2, 3 hands, 3) and claim (2, 3 memories, 3 hands, M, 11); M = 1: silent).
    -> log-prob (2, n), rewards (2, n); player 0's claims by hand appended to tables["read"]."""
    hands = HAND_PAIRS[torch.randint(6, (n // group_size,), generator=gen).repeat_interleave(group_size)].T   # (2, n)
    upper = BEATEN[hands] == hands.flip(0)                                               # (2, n)
    logp = torch.zeros(2, n)
    said = torch.zeros(2, n, dtype=torch.long)
    if tables["claim"].size(3) == 3:                                                     # with messages
        said, logp = draw(tables["msg"][torch.arange(2)[:, None], hands].softmax(-1), gen)
    mem, p = tables["mem"], torch.arange(2)[:, None]
    c, logp_c = draw(tables["claim"][p, mem, hands, said.flip(0)].softmax(-1), gen)      # (2, n)
    coins = torch.stack(shares(c[0].float(), c[1].float()))
    tables["read"].append(torch.stack([c[0][upper[0]].float().sum(), upper[0].sum(), c[0][~upper[0]].float().sum()]))
    other_greedy = ~upper.flip(0) & (c.flip(0) > 5)
    tables["mem"] = 1 + other_greedy.long()
    return logp + logp_c, coins * torch.where(upper, 10.0, 1.0)

def readout(env, tables):
    """Player 0's policy in numbers. Split: expected claims in the fair and in the greedy memory. TAS: the mean claims
    of the last iteration with each hand, and P(message = own hand) (a learner may use another code)."""
    ev = lambda lg: lg.softmax(-1) @ torch.arange(11.0)
    claim = tables["claim"].detach()[0]
    if env == "split":        # (memory, situation): the items worth more / the same / less
        return "claims more / same / less: after fair " + " / ".join(f"{x:4.1f}" for x in ev(claim[1]).tolist()) + \
               " | after greedy " + " / ".join(f"{x:4.1f}" for x in ev(claim[2]).tolist())
    up, n_up, low = torch.stack(tables["read"]).sum(0).tolist()   # this iteration's games, whatever the messages mean
    n = len(tables["read"]) * tables["mem"].size(1)
    out = f"claims with the upper / lower hand {up / max(n_up, 1):4.1f} / {low / max(n - n_up, 1):4.1f}"
    if claim.size(2) == 1:
        return out
    return out + f" | P(message = own hand) {tables['msg'].detach()[0].softmax(-1).diagonal().mean().item():.2f}"

def train_tabular(env, algo, beta, seed, iters=300, start_p10=0.0, start_truthful=0.0, n_games=128, n_rounds=10, lr=0.1,
                  log_every=0):
    """Two independent learners with train.py's credits. -> welfare per round (last 20 iterations), tables."""
    d = envs.GAMES[env].defaults
    gen = torch.Generator().manual_seed(seed)
    shape = {"split": (2, 3, 3, 11), "tas": (2, 3, 3, 3, 11), "tas_silent": (2, 3, 3, 1, 11)}[env]
    claim = torch.zeros(shape)
    if start_p10 > 0:                                    # P(10) = start_p10, the 10 other claims share the rest
        claim[..., 10] = torch.tensor(10 * start_p10 / (1 - start_p10)).log()
    msg = torch.zeros(2, 3, 3)
    if start_truthful > 0:                               # P(message = own hand) = start_truthful
        msg[:, torch.arange(3), torch.arange(3)] = torch.tensor(2 * start_truthful / (1 - start_truthful)).log()
    params = [claim.requires_grad_(True)] + ([msg.requires_grad_(True)] if env == "tas" else [])
    tables = {"claim": claim, "msg": msg}                # msg: used in tas only
    opt = torch.optim.Adam(params, lr=lr)
    group = torch.arange(n_games) // d["group_size"]
    player = torch.zeros(n_games, dtype=torch.long)
    play = play_split if env == "split" else play_tas
    welfare = []
    for it in range(iters):
        tables["mem"], tables["read"] = torch.zeros(2, n_games, dtype=torch.long), []    # memory 0: the opening
        logp, r = map(torch.stack, zip(*(play(tables, n_games, d["group_size"], gen) for _ in range(n_rounds))))
        logp, r = logp.permute(1, 2, 0), r.permute(1, 2, 0)                             # (2, n, T)
        A = torch.stack([advantage.advantages(r[i], d["gamma"], group, player, d["reward_scale"]) for i in (0, 1)])
        C = torch.stack([advantage.credits(algo, A[i], A[1 - i], beta, d["gamma"]) for i in (0, 1)])
        opt.zero_grad()
        (-(C.detach() * logp).mean()).backward()
        opt.step()
        welfare.append(r.sum(0).mean().item())
        if log_every and it % log_every == 0:
            print(f"    {it:4d}  welfare {welfare[-1]:6.1f}  {readout(env, tables)}")
    return sum(welfare[-20:]) / 20, tables

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="split", choices=["split", "tas", "tas_silent"])
    ap.add_argument("--algos", nargs="+", default=["naive", "sum", "adalign"], choices=["naive", "sum", "adalign"])
    ap.add_argument("--beta", nargs="+", type=float, default=None, help="AA's beta(s) (default: the env's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--n_games", type=int, default=128, help="games per iteration, in groups of 8 (the LLM's CPU default: 8)")
    ap.add_argument("--start_p10", nargs="+", type=float, default=[0.0], help="P(claim 10) at the start (0: uniform)")
    ap.add_argument("--start_truthful", type=float, default=0.0, help="tas: P(message = own hand) at the start "
                    "(0: uniform, 1/3)")
    ap.add_argument("--log_every", type=int, default=0, help="print the learning curve every this many iterations")
    args = ap.parse_args()
    if args.seeds < 1 or args.iters < 20 or args.n_games < 8 or args.n_games % 8 or not all(0 <= p < 1 for p in args.start_p10 + [args.start_truthful]):
        ap.error("--seeds must be >= 1, --iters >= 20, --n_games a positive multiple of 8, --start_p10 and "
                 "--start_truthful in [0, 1)")
    for a in range(11):                                  # the vectorized rule is the game's
        for b in range(11):
            got = shares(torch.tensor(float(a)), torch.tensor(float(b)))
            assert all(abs(x.item() - y) < 1e-5 for x, y in zip(got, envs.proportional(a, b)))
    d = envs.GAMES[args.env].defaults
    betas = args.beta or [d["beta"]]
    t0 = time.time()
    ref = "welfare-max 255, greedy 165" if args.env == "split" else "honest cooperators 100, both claiming 10: 55"
    print(f"{args.env}, 2 tabular learners, {args.n_games} games in groups of 8 x 10 rounds, Adam lr 0.1, {args.iters} "
          f"iterations; gamma {d['gamma']}, reward scale {d['reward_scale']:g}. Welfare per round over the last 20 "
          f"iterations ({ref}); player 0's policy")
    runs = [(start, algo, beta) for start in args.start_p10 for algo in args.algos
            for beta in (betas if algo == "adalign" else [0.0])]
    for start, algo, beta in runs:
        name = f"{algo} beta {beta:g}" if algo == "adalign" else algo
        for seed in range(args.seeds):
            if args.log_every:
                print(f"  start P(10) {start:g}, {name}, seed {seed}:")
            w, tables = train_tabular(args.env, algo, beta, seed, args.iters, start, args.start_truthful, args.n_games,
                                      log_every=args.log_every)
            print(f"  start P(10) {start:4.2f}  {name:16s} seed {seed}: welfare {w:5.1f} | {readout(args.env, tables)}",
                  flush=True)
    print(f"({time.time() - t0:.0f} s)")

if __name__ == "__main__":
    main()
