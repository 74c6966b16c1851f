"""
eval.py: face-offs, the memory-one readout, exploitability, transcripts and plots.

    python eval.py --env ipd --a tit_for_tat --b defector                  # two fixed strategies
    python eval.py --env ipd --a out/ckpt --b smollm2-135m --n_games 64    # trained vs base model
    python eval.py --env ipd --matrix out/ckpt,tit_for_tat,defector,cooperator
    python eval.py --env ipd --a out/ckpt --memory_one                     # P(C) at opening, after CC/CD/DC/DD
    python eval.py --env ipd --a out/ckpt --best_response                  # exact exploiter of that readout
    python eval.py --env ipd --exploit out/ckpt --iters 10                 # a naive learner vs the frozen policy
    python eval.py --env ipd --exploit out/ckpt --iters 20 --resume        # ... continued from its checkpoint
    python eval.py --env tas --a out/ckpt --b honest --transcript 2        # readable games (Markdown)
    python eval.py --plot out                                              # learning curves as PNG
    python eval.py --plot runs/aa runs/naive --plot_file cmp.png           # several runs of one game on one figure
    python eval.py --env ipd --a out/ckpt --b api:http://127.0.0.1:8000/v1:MODEL   # any OpenAI-style endpoint
    python eval.py --env ipd --a out/ckpt --b human                        # you, at the terminal
    python eval.py --serve out/ckpt --port 8000                            # your policy as an OpenAI-style endpoint

A POLICY is a fixed strategy from envs.py, `human`, `api:URL:MODEL` (key from $OPENAI_API_KEY), a checkpoint
directory, or a model name for load.load_model. Add --json to print the figures as one JSON line last.
"""
import argparse
import importlib.util
import json
import math
import os
import pathlib
import signal
import sys

import torch

import devices
import envs
import memory
import rundir
import serve
import train
from load import load_model
from remote import ApiPolicy, HumanPolicy, api_policy
from rollout import MEMORY_ONE, FixedPolicy, LMPolicy, memory_one, readout, readout_means, rollout

CLASSIC = {"TFT": (1, 1, 0, 1, 0), "WSLS": (1, 1, 0, 0, 1), "Grudger": (1, 1, 0, 0, 0), "ALLC": (1, 1, 1, 1, 1),
           "ALLD": (0, 0, 0, 0, 0), "GTFT": (1, 1, 1 / 3, 1, 1 / 3)}  # (opening, CC, CD, DC, DD)

def make_policy(spec, env, device="cpu", cache=None, api=None):
    """A POLICY string -> a policy object (LM policies loaded once per spec via cache). api: ApiPolicy settings."""
    cache = {} if cache is None else cache
    if spec in cache:
        return cache[spec]
    strategies = envs.GAMES[env].strategies
    if spec in strategies:
        pol = FixedPolicy(env, spec)
    elif spec == "human":
        pol = HumanPolicy()
    elif spec.startswith("api:"):
        pol = api_policy(spec, **(api or {}))
    else:
        try:
            model, tok = load_model(spec, device, torch.float32)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{spec!r} is not one of the {env} strategies ({', '.join(strategies)}), 'human', "
                             f"'api:URL:MODEL', nor a loadable model: {e}") from None
        rundir.warn_other_game(spec, env)
        pol = LMPolicy(model, tok, os.path.basename(spec.rstrip("/")) or spec)
    cache[spec] = pol
    return pol

# -----------------------------------------------------------------------------
# face-offs

def faceoff(env, pa, pb, n_games, seed=0, n_rounds=10, group_size=1, temperature=1.0, max_msg_tokens=16):
    """n_games of pa vs pb, half with pa in seat 0, half in seat 1. -> (figures dict, Rollout, a_is_seat0)."""
    policies = [pa] if pa is pb else [pa, pb]
    b = 0 if pa is pb else 1
    a_seat0 = (torch.arange(n_games) // group_size) % 2 == 0   # groups on one seat order: both see the same env draws
    seat_policy = torch.stack([torch.where(a_seat0, 0, b), torch.where(a_seat0, b, 0)], 1)
    failed_before = {id(p): p.failures for p in (pa, pb) if isinstance(p, ApiPolicy)}
    with torch.no_grad():
        ro = rollout(env, policies, seat_policy, n_games, seed=seed, group_size=group_size, n_rounds=n_rounds,
                     temperature=temperature, max_msg_tokens=max_msg_tokens)
    a_row = 2 * torch.arange(n_games) + (~a_seat0).long()
    b_row = a_row ^ 1
    per_game = lambda x: x.float().mean(1)                     # (G,) mean over rounds
    ra, rb = per_game(ro.rewards[a_row]), per_game(ro.rewards[b_row])
    out = {"reward_a": ra.mean().item(), "reward_b": rb.mean().item(), "welfare": (ra + rb).mean().item(),
           "se_a": se(ra), "se_b": se(rb), "se_welfare": se(ra + rb),
           "invalid_a": ro.invalid[a_row].float().mean().item(), "invalid_b": ro.invalid[b_row].float().mean().item(),
           "n_games": n_games}
    x = readout(ro, env)                                                    # (N, T, K, 2)
    for who, rows in (("a", a_row), ("b", b_row)):
        out.update({f"{k}_{who}": v for k, v in readout_means(x[rows].sum((0, 1)), env).items()})
        if envs.GAMES[env].by_round:                                        # each key's mean by round
            by = x[rows].sum(0)                                             # (T, K, 2)
            for i, k in enumerate(envs.GAMES[env].readout):
                out[f"{k}_by_round_{who}"] = (by[:, i, 0] / by[:, i, 1].clamp(min=1)).tolist()
    for who, pol in (("a", pa),) if pa is pb else (("a", pa), ("b", pb)):    # self-play: one policy, one count
        if isinstance(pol, ApiPolicy):
            out[f"api_failures_{who}"] = pol.failures - failed_before[id(pol)]
    return out, ro, a_seat0

def se(x):
    """Standard error of the mean; None for one game (no spread to measure; NaN would not be valid JSON)."""
    return (x.std().item() / math.sqrt(len(x))) if len(x) > 1 else None

def pm(x):
    return f" ± {x:.3f}" if x is not None else ""

def faceoff_table(env, names, fig):
    game = envs.GAMES[env]
    rows = ["| player | reward/round | invalid rate |", "|---|---|---|"]
    for who, name in zip("ab", names):
        rows.append(f"| {who}: {name} | {fig['reward_' + who]:.3f}{pm(fig['se_' + who])} | {fig['invalid_' + who]:.3f} |")
    keys = [k for k in game.readout if f"{k}_a" in fig or f"{k}_b" in fig]
    if keys:                                                  # the game's readout (IPD cooperation, claims)
        rows += ["", "| readout | " + " | ".join(game.readout[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
        rows += [f"| {who}: {name} | " + " | ".join(f"{fig.get(f'{k}_{who}', float('nan')):.2f}" for k in keys) + " |"
                 for who, name in zip("ab", names)]
    for k in (k for k in game.readout if f"{k}_by_round_a" in fig):
        T = len(fig[f"{k}_by_round_a"])
        rows += ["", f"| {game.readout[k]} by round | " + " | ".join(str(t) for t in range(T)) + " |", "|---|" + "---|" * T]
        rows += [f"| {who}: {name} | " + " | ".join(f"{c:.2f}" for c in fig[f"{k}_by_round_{who}"]) + " |"
                 for who, name in zip("ab", names)]
    rows.append(f"\ncollective welfare (sum per round): {fig['welfare']:.3f}{pm(fig['se_welfare'])} "
                f"over {fig['n_games']} games (both seat orders)")
    for who, name in zip("ab", names):
        n = fig.get(f"api_failures_{who}", 0)
        if n:
            rows.append(f"WARNING: {name} failed to answer {n} time(s) (after retries); each failure was played as "
                        "an empty reply, i.e. an invalid move (the least cooperative one): these numbers are not a "
                        "fair measure of that model")
    return "\n".join(rows)

def transcript(env, names, ro, a_seat0, k, path):
    """Write k games as Markdown: each round's messages, moves and rewards."""
    lines = [f"# {env}: {names[0]} (a) vs {names[1]} (b)\n"]
    for gi, g in enumerate(ro.games[:k]):
        seat_name = [names[0], names[1]] if a_seat0[gi] else [names[1], names[0]]
        lines.append(f"## Game {gi}: seat 0 = {seat_name[0]}, seat 1 = {seat_name[1]}\n")
        for t, info in enumerate(g.info):
            lines.append(f"**Round {t}**")
            lines += envs.GAMES[env].describe_round(info)
            inv = "".join(f" (seat {s} invalid)" for s in (0, 1) if g.invalid[t][s])
            lines.append(f"- rewards: {g.rewards[t][0]:g} / {g.rewards[t][1]:g}{inv}\n")
    written(path, lambda: pathlib.Path(path).write_text("\n".join(lines)))   # closed inside: a failed flush is caught

def written(path, write, kept="the figures printed above are kept"):
    """Run write() (it writes path); a failure is one line that names the path and what is kept."""
    try:
        write()
    except OSError as e:
        sys.exit(f"error: could not write {path} ({e.strerror or e}); {kept}")

# -----------------------------------------------------------------------------
# memory-one readout

def nearest_classic(v):
    vec = [v[k] for k in MEMORY_ONE]
    d = {name: math.dist(vec, ref) for name, ref in CLASSIC.items()}
    best = min(d, key=d.get)
    return best, d[best]

# -----------------------------------------------------------------------------
# exploitability and plots

def exploit(env, frozen, iters, out_dir, extra, resume=False, overwrite=False):
    """Train a fresh naive learner from the base model against the frozen POLICY with train.py's loop (a
    checkpoint every 10 iterations and at the end). As with train.py, a run already in out_dir is continued up to
    iters (resume), replaced (overwrite), or else left alone with a one-line error."""
    run = ["--resume", "true"] if resume else ["--overwrite", "true"] if overwrite else []
    argv = ["--env", env, "--algo", "naive", "--opponent", frozen, "--max_iters", str(iters), "--out_dir", out_dir]
    train.main(argv + run + extra)
    return read_log(out_dir)

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: --plot needs matplotlib (pip install matplotlib); nothing else in eval.py does")
    return plt

def read_log(run_dir):
    f = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(f):
        sys.exit(f"error: no log.jsonl in {run_dir}")
    log, bad = [], 0
    for line in open(f):
        try:
            log.append(json.loads(line))
        except json.JSONDecodeError:                          # e.g. a run killed in the middle of a write
            bad += 1
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) of {f}", file=sys.stderr)
    if not log:
        sys.exit(f"error: {f} has no iterations yet")
    return log

def log_env(log, env):
    """The game a train.py log is about: the env its lines name, else the game whose readout keys appear in any of
    its lines (tas_silent's are tas's), else env (the --env given). None, with a warning, when nothing says."""
    named = {r["env"] for r in log if "env" in r}
    if len(named) > 1:
        sys.exit(f"error: --plot: one log names several games ({', '.join(sorted(named))})")
    keys = set().union(*log)
    game = named.pop() if named else next((n for n, g in envs.GAMES.items() if g.readout and
                                           next(iter(g.readout)) in keys), env)
    if game is None:
        print("warning: a log does not say which game it is: drawn without the game's references (give --env)",
              file=sys.stderr)
    return game

def plot_references(ax, game):
    """The welfare of each fixed strategy in self-play (the game's welfare_reference) as gray lines."""
    for name, ref in game.welfare_reference.items():
        ax.axhline(ref, color="gray", lw=0.7, ls=":")
        ax.annotate(f"{name} x2 ({ref:g})", (0, ref), fontsize=7, color="gray", va="bottom")

def plot_run(run_dir, path=None, env=None):
    """Learning curves of one run (run_dir/log.jsonl) -> PNG: rewards and welfare per round against the fixed
    strategies' self-play welfare; the rates (IPD cooperation, invalid moves, TAS messages naming the hand);
    Split / TAS claims by situation; the IPD memory-one readouts and best responses logged at checkpoints."""
    plt = _pyplot()
    log = read_log(run_dir)
    game = envs.GAMES.get(log_env(log, env), envs.Game)              # Game: no readout, no references
    claims = [k for k in game.readout if k.startswith("claim") and k in log[-1]]
    rates = [k for k in ("coop", "invalid", "tells_hand") if k in log[-1]]
    mem = [r for r in log if "memory_one" in r]
    br = [r for r in log if "best_response" in r]
    n = 2 + bool(claims) + bool(mem) + bool(br)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), subplot_kw=dict(xlabel="iteration"))
    it = [r["iter"] for r in log]
    for k in ("welfare", "reward_trained", "reward_opponent", "reward_seat0", "reward_seat1"):
        if k in log[-1]:                                     # the seats' lines are thin: they often equal the others
            axes[0].plot(it, [r[k] for r in log], label=k, **(dict(ls=":", lw=0.9) if "seat" in k else {}))
    plot_references(axes[0], game)
    for k in rates:
        axes[1].plot(it, [r[k] for r in log], label=k)
    axes[0].set_title("reward per round")
    axes[1].set(title="rates", ylim=(-0.05, 1.05))
    panel = iter(axes[2:])
    if claims:
        ax = next(panel)
        for k in claims:
            ax.plot(it, [r[k] for r in log], label=k)
        ax.set(title="trained seat's claims by situation", ylim=(-0.3, 10.3))
    if mem:
        ax = next(panel)
        for k in MEMORY_ONE:
            ax.plot([r["iter"] for r in mem], [r["memory_one"][k] for r in mem], marker="o", label=f"P(C|{k})")
        ax.set(title="memory-one P(cooperate)", ylim=(-0.05, 1.05))
    if br:
        ax = next(panel)
        for k, ls in (("exploiter", "-"), ("policy", "--")):
            ax.plot([r["iter"] for r in br], [r["best_response"][k] for r in br], ls, marker="o", label=k)
        ax.axhline(3.2, color="gray", lw=0.5, label="TFT's exploiter (3.2)")
        ax.set_title("exact best response: reward/round")
    fig.suptitle(run_dir)
    return save_plot(fig, axes, path or os.path.join(run_dir, "curves.png"))

def save_plot(fig, axes, path):
    """The legends (of the panels that have labelled lines: a log from before the claims readout has none), then
    the figure as PNG at path. -> path"""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    written(path, lambda: fig.savefig(path, dpi=90), "the logs are unchanged")
    return path

def smooth(y, k=10):
    """Trailing mean over the last k points (fewer at the start): per-iteration figures of 8 games are noisy."""
    return [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]

def plot_compare(run_dirs, path, env=None):
    """Several runs of one game (read from the logs; env for logs from before the readouts) on one figure -> PNG.
    Welfare per iteration (faint) and its 10-iteration mean against the welfare of fixed strategies in self-play
    (the game's welfare_reference); IPD adds the cooperation rate and the last memory-one readout; Split/TAS the trained
    seat's reward, its claims by situation (its readout: linestyle per situation) and the rates (invalid moves;
    TAS: messages that name the own hand), all 10-iteration means."""
    plt = _pyplot()
    logs = [read_log(d) for d in run_dirs]
    games = sorted({log_env(log, env) for log in logs} - {None})
    if len(games) > 1:
        sys.exit(f"error: --plot: these runs are of different games ({', '.join(games)}): plot each game apart")
    game = envs.GAMES.get(games[0] if games else None, envs.Game)
    ipd = game.memory_one                                           # the IPD: cooperation and memory-one panels
    fig, axes = plt.subplots(1, 3 if ipd else 4, figsize=(15 if ipd else 20, 4))
    plot_references(axes[0], game)
    styles = ("-", "--", ":")
    for i, (d, log) in enumerate(zip(run_dirs, logs)):
        c = f"C{i}"
        name = os.path.basename(os.path.normpath(d))
        it = [r["iter"] for r in log]
        welfare = [r["welfare"] for r in log]
        axes[0].plot(it, welfare, color=c, alpha=0.25, lw=0.8)
        axes[0].plot(it, smooth(welfare), color=c, label=name)
        if ipd:
            axes[1].plot(it, [r.get("coop", float("nan")) for r in log], color=c, label=name)
            mem = [r for r in log if "memory_one" in r]
            if mem:
                axes[2].plot(range(len(MEMORY_ONE)), [mem[-1]["memory_one"][k] for k in MEMORY_ONE], marker="o",
                             color=c, label=f"{name} (iter {mem[-1]['iter']})")
            continue
        axes[1].plot(it, smooth([r["reward_trained"] for r in log]), color=c, label=name)
        claim_keys = [k for k in game.readout if k.startswith("claim") and k in log[-1]]
        for k, ls in zip(claim_keys, styles):
            axes[2].plot(it, smooth([r.get(k, float("nan")) for r in log]), color=c, ls=ls, label=f"{name}: {k}")
        rates = ["invalid"] + [k for k in game.readout if not k.startswith("claim") and k in log[-1]]
        for k, ls in zip(rates, styles):
            axes[3].plot(it, smooth([r.get(k, float("nan")) for r in log]), color=c, ls=ls, label=f"{name}: {k}")
    axes[0].set_title("welfare per round (line: 10-iteration mean)")
    if ipd:
        axes[1].set(title="cooperation rate", ylim=(-0.05, 1.05))
        axes[2].set(title="last memory-one P(cooperate)", ylim=(-0.05, 1.05))
        axes[2].set_xticks(range(len(MEMORY_ONE)), list(MEMORY_ONE))
    else:
        axes[1].set_title("trained seat's reward per round (10-iteration mean)")
        axes[2].set(title="trained seat's claims by situation (10-iteration mean)", ylim=(-0.3, 10.3))
        axes[3].set(title="rates (10-iteration mean)", ylim=(-0.02, 1.02))
    for ax in axes[:2] if ipd else axes:
        ax.set_xlabel("iteration")
    return save_plot(fig, axes, path)

# -----------------------------------------------------------------------------

def check_memory(cache, args):
    """Each language-model policy made (cache: make_policy's) against the memory its games will take, before any
    KV cache is allocated."""
    for p in (p for p in cache.values() if isinstance(p, LMPolicy)):
        memory.check_play(p, args.env, args.n_games, args.n_rounds, args.max_msg_tokens)

def yes_no(s):
    """--resume / --overwrite: bare means true; true / false also, as train.py takes them."""
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    raise argparse.ArgumentTypeError(f"want true or false, got {s!r}")

def main(argv=None):
    class Help(argparse.RawDescriptionHelpFormatter):                  # the docstring's examples as written
        def _get_help_string(self, action):                              # and the defaults that say something
            d = action.default
            shown = d is not None and d is not False and d not in ("", argparse.SUPPRESS)
            return (action.help or "") + (" (default: %(default)s)" if shown else "")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--env", choices=list(envs.GAMES), help="the game (default: ipd; --plot reads it from the logs)")
    ap.add_argument("--a", help="POLICY in seat a")
    ap.add_argument("--b", help="POLICY in seat b (default: same as a, self-play)")
    ap.add_argument("--n_games", type=int, default=32, help="games per face-off (2 trajectories each)")
    ap.add_argument("--n_rounds", type=int, default=10, help="rounds per game")
    ap.add_argument("--group_size", type=int, default=1, help="games sharing an environment seed")
    ap.add_argument("--seed", type=int, default=0, help="plays the same games for the same seed")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--max_msg_tokens", type=int, default=16, help="tas: message budget (train.py's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where LM policies run")
    ap.add_argument("--api_timeout", type=float, default=30.0, help="api: seconds per request (capped at 300)")
    ap.add_argument("--api_retries", type=int, default=2, help="api: retries per reply (capped at 5)")
    ap.add_argument("--api_max_reply_chars", type=int, default=2000, help="api: longer replies are cut (kept and re-sent)")
    ap.add_argument("--matrix", help="P1,P2,...: face-off matrix of every ordered pair")
    ap.add_argument("--memory_one", action="store_true", help="ipd: exact P(C) of --a at opening, CC, CD, DC, DD")
    ap.add_argument("--best_response", action="store_true", help="ipd: exact best response to --a's memory-one readout")
    ap.add_argument("--exploit", metavar="POLICY", help="train a naive learner against this frozen POLICY")
    ap.add_argument("--iters", type=int, default=10, help="--exploit: training iterations")
    ap.add_argument("--exploit_args", default="", help="--exploit: extra train.py args, e.g. '--lr 1e-4 --n_games 8'")
    ap.add_argument("--out_dir", default="out_exploit", help="--exploit: where the learner's run goes")
    ap.add_argument("--resume", type=yes_no, nargs="?", const=True, default=False,
                    help="--exploit: continue the run in --out_dir up to --iters")
    ap.add_argument("--overwrite", type=yes_no, nargs="?", const=True, default=False,
                    help="--exploit: replace the run already in --out_dir")
    ap.add_argument("--transcript", type=int, default=0, metavar="K", help="write K games to --transcript_file")
    ap.add_argument("--transcript_file", default="transcript.md", help="--transcript: the Markdown file")
    ap.add_argument("--plot", metavar="RUN_DIR", nargs="+", help="learning curves of a train.py run as PNG "
                    "(RUN_DIR/curves.png); several runs: one comparison figure (compare.png)")
    ap.add_argument("--plot_file", default="", help="--plot: where the figure goes instead")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    ap.add_argument("--serve", metavar="POLICY", help="serve a language-model POLICY as an OpenAI-compatible endpoint")
    ap.add_argument("--port", type=int, default=8000, help="--serve: the port")
    ap.add_argument("--host", default="127.0.0.1", help="--serve: the address (another than 127.0.0.1 needs --token)")
    ap.add_argument("--token", default="", help="--serve: the bearer token clients must send")
    args = ap.parse_args(argv)
    plot_env, args.env = args.env, args.env or "ipd"                  # --plot: the logs say which game, unless --env
    devices.use_cpu_threads()
    if args.n_games < 1 or args.n_rounds < 1 or args.group_size < 1 or args.n_games % args.group_size:
        ap.error("need n_games >= 1, n_rounds >= 1 and n_games a multiple of group_size")
    if args.max_msg_tokens < 1:
        ap.error(f"--max_msg_tokens must be at least 1 (the end tag), got {args.max_msg_tokens}")
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if (args.resume or args.overwrite) and not args.exploit:
        ap.error("--resume and --overwrite are about an --exploit run: give --exploit POLICY too")
    if args.resume and args.overwrite:
        ap.error("--resume continues the run in --out_dir, --overwrite replaces it: give one")
    if args.exploit and args.iters < 1:
        ap.error(f"--iters must be at least 1 (the learner's training iterations), got {args.iters}")
    for flag, f in (("--transcript_file", args.transcript and args.transcript_file), ("--plot_file", args.plot_file)):
        if f and not os.path.isdir(os.path.dirname(os.path.abspath(f))):
            ap.error(f"{flag} {f}: its directory does not exist")
    api = dict(timeout=args.api_timeout, retries=args.api_retries, max_reply_chars=args.api_max_reply_chars)
    cache = {}
    try:
        devices.check_device(args.device)
        if args.serve:
            pol = make_policy(args.serve, args.env, args.device, cache, api)
            if not isinstance(pol, LMPolicy):
                ap.error(f"--serve needs a language model (a checkpoint, the embedded model, random:SHAPE), got {args.serve!r}")
            srv = serve.serve(pol.model, pol.tok, pol.name, args.host, args.port, args.token)
            print(f"serving {pol.name!r} at http://{args.host}:{srv.server_address[1]}/v1 (Ctrl-C stops)", flush=True)
            srv.serve_forever()
        elif args.plot:
            path = (plot_run(args.plot[0], args.plot_file or None, plot_env) if len(args.plot) == 1 else
                    plot_compare(args.plot, args.plot_file or "compare.png", plot_env))
            print(f"wrote {path}")
            out = {"plot": path}
        elif args.memory_one or args.best_response:
            if not envs.GAMES[args.env].memory_one or not args.a:
                ap.error("--memory_one and --best_response need --env ipd and --a POLICY")
            v = memory_one(make_policy(args.a, args.env, args.device, cache, api))
            name, dist = nearest_classic(v)
            print("| opening | after CC | after CD | after DC | after DD |\n|---|---|---|---|---|\n| " +
                  " | ".join(f"{v[k]:.3f}" for k in MEMORY_ONE) + " |")
            print(f"nearest classic strategy: {name} (distance {dist:.3f})")
            out = {**v, "nearest": name, "distance": dist}
            if args.best_response:
                br = envs.ipd_best_response(v, args.n_rounds)
                print(f"best response over {args.n_rounds} rounds (exploiter knows the horizon, sees every move): "
                      f"exploiter {br['exploiter']:.2f}, policy {br['policy']:.2f} per round")
                out = {**br, "memory_one": v}
        elif args.exploit:
            extra = args.exploit_args.split() + ["--n_rounds", str(args.n_rounds), "--device", args.device]
            log = exploit(args.env, args.exploit, args.iters, args.out_dir, extra, args.resume, args.overwrite)
            print("| iteration | learner reward/round | frozen policy reward/round |\n|---|---|---|")
            for r in log:
                print(f"| {r['iter']} | {r['reward_trained']:.3f} | {r['reward_opponent']:.3f} |")
            plot = plot_run(args.out_dir, env=args.env) if importlib.util.find_spec("matplotlib") else "matplotlib missing"
            print(f"log: {args.out_dir}/log.jsonl; plot: {plot}")
            out = {"learner": [r["reward_trained"] for r in log], "frozen": [r["reward_opponent"] for r in log]}
        elif args.matrix:
            names = [s for s in args.matrix.split(",") if s]
            pols = [make_policy(s, args.env, args.device, cache, api) for s in names]
            check_memory(cache, args)
            M, figs, stopped = [[None] * len(pols) for _ in pols], {}, False
            pairs = [(i, j) for i in range(len(pols)) for j in range(i, len(pols))]    # one face-off per pair
            try:
                for i, j in pairs:
                    fig = faceoff(args.env, pols[i], pols[j], args.n_games, args.seed, args.n_rounds,
                                  args.group_size, args.temperature, args.max_msg_tokens)[0]
                    figs[f"{names[i]} vs {names[j]}"] = fig           # self-play holds both seats: half the welfare
                    M[i][j], M[j][i] = (fig["welfare"] / 2,) * 2 if i == j else (fig["reward_a"], fig["reward_b"])
            except KeyboardInterrupt:                                   # keep the face-offs already played
                stopped = True
            print("| row vs column | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
            for name, row in zip(names, M):
                print(f"| {name} | " + " | ".join("-" if x is None else f"{x:.2f}" for x in row) + " |")
            print("(cell: mean reward per round of the row player, averaged over both seats)")
            out = {"names": names, "matrix": M, "faceoffs": figs}
            if stopped:
                print(f"interrupted after {len(figs)} of {len(pairs)} face-offs: the cells marked - were not played")
                if args.json:
                    print(json.dumps(out))
                raise KeyboardInterrupt
        else:
            if not args.a:
                ap.error("give --a POLICY (and --b POLICY), or one of --matrix, --memory_one, --exploit, --plot")
            pa = make_policy(args.a, args.env, args.device, cache, api)
            pb = make_policy(args.b or args.a, args.env, args.device, cache, api)
            check_memory(cache, args)
            fig, ro, a_seat0 = faceoff(args.env, pa, pb, args.n_games, args.seed, args.n_rounds, args.group_size,
                                       args.temperature, args.max_msg_tokens)
            print(faceoff_table(args.env, [args.a, args.b or args.a], fig))
            if args.transcript:
                transcript(args.env, [args.a, args.b or args.a], ro, a_seat0, args.transcript, args.transcript_file)
                k = min(args.transcript, args.n_games)
                print(f"wrote {k} game{'s' if k > 1 else ''} to {args.transcript_file}")
            out = fig
        if args.json:                                                   # the figures as one JSON line, last
            print(json.dumps(out))
    except ValueError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)          # `kill PID` stops it like Ctrl-C does
    main()
