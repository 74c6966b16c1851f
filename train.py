"""
train.py: fine-tune a small LLM to play a social dilemma with Advantage Alignment (or naive REINFORCE,
or the sum-of-rewards oracle), a group-relative leave-one-out baseline, and full fine-tuning.

    python train.py --env ipd                       # the embedded SmolLM2-135M-Instruct, on a CPU
    python train.py --env ipd --algo naive          # plain policy gradient, self-play
    python train.py --env ipd --algo naive --opponent out/ckpt    # exploit a frozen policy
    python train.py --preset paper --env tas        # the paper's settings (a GPU)
    torchrun --nproc_per_node 8 train.py --preset paper --model_name Qwen/Qwen2.5-7B-Instruct --fsdp true   # sharded
    python train.py --help                          # every knob with its default

Each iteration: 1. seats (who plays whom) -> 2. play n_games (rollout.py) -> 3. advantages and credits
(advantage.py) -> 4. one optimizer step of the token-level REINFORCE loss -> 5. the agent buffer's snapshot
-> 6. one log line, a checkpoint every ckpt_interval iterations (rundir.py keeps the run directory).
Simplifications against the released code, on purpose:
  1. Full fine-tuning of a small model instead of LoRA on a 7B model.
  2. Constrained decoding of actions, trained with the same masked policy (on-policy); free text for messages.
  3. The loss averages over decision tokens: tokens forced by the action format (one legal choice) have
     log-prob 0 under the masked policy and carry no gradient, so they are not counted.
  4. All randomness of iteration i derives from (seed, i), so --resume continues the same stream.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import advantage
import devices
import envs
import memory
import rundir
from configurator import parse_args, resolve
from load import load_dir, load_model
from remote import api_policy
from rollout import FixedPolicy, LMPolicy, memory_one, readout, rollout

# -----------------------------------------------------------------------------
# config: every knob, with its default. Override with --key value or --key=value.
env = "ipd"               # a game of envs.GAMES: ipd | split | tas | tas_silent (tas without messages)
model_name = "smollm2-135m"  # embedded model, a HF checkpoint dir, or a HF repo id (needs a hub)
out_dir = "out"           # checkpoints and log.jsonl go here
resume = False            # continue from out_dir/ckpt (knobs given on the command line override the checkpoint's)
overwrite = False         # a fresh run may replace the run already in out_dir
max_iters = 30            # training iterations
ckpt_interval = 10        # checkpoint every this many iterations (and at the end)
seed = 0
# games
n_games = 0               # games per iteration (2 trajectories each); 0 = the game's default (ipd 16, split/tas 4: a CPU's)
n_rounds = 10             # rounds per game (never told to the players)
group_size = 0            # games sharing an environment seed; 0 = the game's default (ipd 1, split/tas 8), or all when fewer
max_msg_tokens = 16       # sampled tokens of a TAS message after its (fed) start tag, end tag included; the paper: 128
temperature = 1.0         # sampling temperature during training
constrained = True        # constrained decoding of actions (false: free sampling, to measure invalid moves)
cuda_graph = True         # on a GPU, replay long decode turns (messages) as CUDA graphs (H200: TAS rollout ~3x faster); no effect on a CPU
# algorithm
algo = "adalign"          # adalign | naive | sum
jit = False               # AA's "jit" form (k <= t, no extra gamma) instead of the released one
beta = -1.0               # AA strength; -1 = the game's default (ipd 0.5, split 1.0, tas 2.0)
gamma = -1.0              # discount; -1 = the game's default (0.9, 0.9, 0.96)
reward_scale = -1.0       # rewards are multiplied by this; -1 = the game's default (1/5, 1/100, 1/100)
entropy_coef = -1.0       # entropy bonus; -1 = the game's default for adalign (ipd 0.01, else 0), 0 for naive/sum
kl_coef = -1.0            # k3 KL to the initial model; -1 = the game's default (0.001 for split/tas, else 0)
opponent = ""             # train one seat against a fixed strategy (envs.py), a frozen checkpoint dir, or api:URL:MODEL
api_concurrency = 16      # --opponent api:...: requests in flight at once (a turn's replies, one per game)
api_timeout = 30.0        # --opponent api:...: seconds a request may take, all of it (then retried twice)
buffer_interval = 10      # AA agent buffer: snapshot the policy every this many iterations
buffer_size = 4           # AA agent buffer: snapshots kept (bf16, on disk in out_dir/snapshots)
buffer_prob = 0.5         # AA: probability that a game's opponent is a past snapshot (else the live policy)
buffer_fixed = "auto"     # AA: fixed strategies mixed into the agent buffer ("defector,random"; "" none; auto: the game's, ipd defector)
buffer_fixed_prob = -1.0  # AA: probability that a game's opponent is one of buffer_fixed (-1: the game's, ipd 0.125)
# optimization
lr = 1e-5                 # Adam learning rate (full fine-tuning)
weight_decay = 0.0
grad_clip = 1.0           # max gradient norm
skip_no_signal = True     # skip the step when every credit is 0: Adam would turn a tiny entropy/KL gradient into a full step
micro_tokens = 0          # tokens per forward/backward; 0 = per device (CPU 2560: ~1.5 GB per 1000 tokens of SmolLM2 in fp32)
device = "auto"           # auto | cpu | cuda | cuda:1 ...
fsdp = False              # shard the policy's weights, gradients and Adam over the processes (FSDP2; torchrun, devices.py)
fsdp_offload = False      # with --fsdp on CUDA: keep the shards in host memory (a model whose state exceeds the GPUs)
dry_run = False           # print what each process will hold in memory (memory.py) and stop, loading no weights
dtype = "auto"            # auto (cuda: bfloat16, cpu: float32) | float32 | bfloat16: autocast dtype (weights stay fp32)
preset = ""               # "paper": the released hyperparameters (128/64 games, lr 3e-6) on Qwen2.5-1.5B (a GPU)
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]

def defaults():
    """The knobs above with their defaults: a fresh dict, for parse_args to fill in."""
    return {k: globals()[k] for k in CONFIG_KEYS}

# -----------------------------------------------------------------------------
# ALGO LOGIC: from a rollout to the token-level loss

def token_credits(ro, C):
    """Per-round credits C (N, T) -> per-token credits (N, L), zero where the token is not trained."""
    return torch.where(ro.action_mask, C.gather(1, ro.token_round.clamp(min=0)), 0.0)

def compute_credits(rewards, trained, cfg, keep=None):
    """Advantages of every trajectory (own baseline per group and player), then each algorithm's credit.
    rewards (N, T) of all the games (rows 2g, 2g+1: game g's seats); trained (N,) bool: rows whose tokens get
    gradient. Player id = (trained or not, seat): a frozen opponent never shares a baseline with the trained
    policy. keep (N,) bool: rows of games left out (an API failed in them) get baselines of their own and no
    credit. -> credits (N, T), advantages (N, T)."""
    seat, group = torch.arange(rewards.size(0)) % 2, torch.arange(rewards.size(0)) // 2 // cfg["group_size"]
    player = (~trained).long() * 2 + seat + (0 if keep is None else (~keep).long() * 4)
    A = advantage.advantages(rewards, cfg["gamma"], group, player, cfg["reward_scale"])
    A_opp = A[torch.arange(A.size(0)) ^ 1]           # rows 2g and 2g+1 are the two seats of game g
    C = advantage.credits(cfg["algo"], A, A_opp, cfg["beta"], cfg["gamma"], cfg["jit"])
    return (C if keep is None else C * keep[:, None]), A

def shared_prefix(ids, mask):
    """Length of the token prefix all rows share (the system prompt and game intro) before any scored token.
    Found here rather than taken from the rollout, which shares only the intro: in the IPD the first round's
    prompt and the action's forced '<' are the same for every row too, so this prefix is longer."""
    if ids.size(0) < 2:
        return 0
    differ = (ids != ids[:1]).any(0) | mask.any(0)                   # (L,)
    return int(differ.nonzero()[0]) if differ.any() else 0

def batches(ro, decision, tok_credit, trained, max_tokens, dev, share=True):
    """The trained rows in micro-batches of at most max_tokens padded tokens, on dev: -> (ids (b, L), mask (b, L) of
    the decision tokens, their allowed sets (n, K), the shared prefix's length (0 unless share), their credits (n,))
    per batch."""
    for mb in devices.micro_batches(trained.nonzero().flatten().tolist(), ro.length, max_tokens):
        L = int(ro.length[mb].max())
        sel = decision[mb, :L]                                          # (b, L) on the CPU: no device sync to test it
        if sel.any():
            yield (ro.ids[mb, :L].to(dev), sel.to(dev), ro.allowed[mb, :L][sel].to(dev),
                   shared_prefix(ro.ids[mb, :L], sel) if share else 0, tok_credit[mb, :L][sel].to(dev))

def update(model, ref_model, opt, ro, credit, trained, cfg, autocast, world=1):
    """One optimizer step of L = -(1/N) sum C log pi - ent * H + kl * k3, over the N decision tokens of the
    trained rows (of every process), in micro-batches. Returns stats; skips the step if the loss or grads are
    not finite, or if there is no signal: all credits 0 (with skip_no_signal; otherwise only when the entropy
    and KL terms are off too). Adam normalizes a gradient's scale away, so a step driven by the entropy bonus
    alone moves the weights as far as a real one."""
    tok_credit = token_credits(ro, credit)                              # (N, L)
    decision = ro.decision & trained[:, None]                          # (N, L)
    dev = cfg["device"] if cfg.get("fsdp_offload") else next(model.parameters()).device   # (offload: weights in host memory)
    n_tok, n_credited = devices.all_sum(torch.tensor([decision.sum().item(), tok_credit[decision].abs().gt(0).sum().item()],
                                                     dtype=torch.float64, device=dev), world).tolist()
    stats = dict(loss=0.0, entropy=0.0, kl=0.0, n_tok=int(n_tok), skipped="")
    if n_tok == 0 or n_credited == 0 and (cfg["skip_no_signal"] or cfg["entropy_coef"] == cfg["kl_coef"] == 0):
        stats["skipped"] = "no signal"
        return stats
    opt.zero_grad(set_to_none=True)
    total = torch.zeros(3, device=dev)                                  # loss, entropy, kl sums: read once, at the end
    todo = list(batches(ro, decision, tok_credit, trained, devices.micro_batch_tokens(cfg, model.cfg, dev), dev,
                        share=not devices.sharded(model)))    # FSDP: no shared prefix (it runs each block twice)
    pad = devices.passes_behind(len(todo), model, world, dev)  # FSDP: as many passes on every process, empty ones
    todo += [(ro.ids[:1, :2].to(dev), torch.zeros(1, 2, dtype=torch.bool, device=dev), ro.allowed[:0, 0].to(dev), 0,
              torch.zeros(0, device=dev))] * pad if pad else []
    for ids, mask, allowed, P, c in todo:
        with autocast:
            logp, ent = model.token_logprobs(ids, mask, allowed, P, cfg["temperature"])
        loss = -(c * logp).sum() - cfg["entropy_coef"] * ent.sum()
        k3 = torch.zeros((), device=dev)
        if ref_model is not None and cfg["kl_coef"] > 0:
            with torch.no_grad(), autocast:
                ref_logp, _ = ref_model.token_logprobs(ids, mask, allowed, P, cfg["temperature"])
            diff = ref_logp - logp
            k3 = (diff.exp() - diff - 1).sum()                          # k3 estimator of KL(pi || pi_ref)
            loss = loss + cfg["kl_coef"] * k3
        (loss / n_tok).backward()
        total += torch.stack([loss.detach(), ent.sum().detach(), k3.detach()]) / n_tok
    devices.all_sum_grads(model, world)                                 # several processes: one summed gradient
    stats["loss"], stats["entropy"], stats["kl"] = devices.all_sum(total, world).tolist()
    norm = devices.full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]))
    if not math.isfinite(stats["loss"]) or not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        stats["skipped"] = "non-finite loss or gradient"
        return stats
    opt.step()
    stats["grad_norm"] = norm.item()
    return stats

# -----------------------------------------------------------------------------
# opponents and seats

def setup_opponents(cfg, tok, dev, ckpt):
    """The other seat's policies: --opponent (a fixed strategy or a frozen checkpoint), or for AA the agent
    buffer's network (its weights swapped for a snapshot each iteration) plus its fixed strategies; naive and
    sum play themselves. -> (opponent policy or None, its network or None, [fixed buffer policies])."""
    env = cfg["env"]
    strategies = envs.GAMES[env].strategies
    if cfg["opponent"] in strategies:
        return FixedPolicy(env, cfg["opponent"]), None, []
    if cfg["opponent"].startswith("api:"):                              # its key: $OPENAI_API_KEY, never printed
        try:
            return api_policy(cfg["opponent"], concurrency=cfg["api_concurrency"], timeout=cfg["api_timeout"]), None, []
        except ValueError as e:
            sys.exit(f"error: --opponent: {e}")
    if cfg["opponent"]:
        try:
            opp_model, opp_tok = load_model(cfg["opponent"], dev, torch.float32)
        except (OSError, RuntimeError, ValueError) as e:
            sys.exit(f"error: --opponent is neither one of the {env} strategies ({', '.join(strategies)}) "
                     f"nor a loadable model: {e}")
        rundir.warn_other_game(cfg["opponent"], env)
        return LMPolicy(opp_model.eval(), opp_tok, "frozen"), opp_model, []
    if cfg["algo"] != "adalign":
        return None, None, []
    opp_model = load_dir(ckpt, dev, torch.float32)[0] if ckpt else load_model(cfg["model_name"], dev, torch.float32)[0]
    fixed = [FixedPolicy(env, n) for n in cfg["buffer_fixed"].split(",") if n]
    return LMPolicy(opp_model.eval(), tok, "snapshot"), opp_model, fixed

def assign_seats(G, cfg, live, opp, fixed, opp_model, snapshots, gen):
    """-> policies, seat_policy (G, 2) indices into policies, trained (2G,) bool. Naive/sum: self-play, both
    seats train. Otherwise the trained seat alternates by group and the other seat is the opponent; for the
    AA buffer, per game: a fixed strategy with buffer_fixed_prob, else a past snapshot with buffer_prob
    (loaded into opp_model), else the live policy. All draws come from gen (seed, iteration)."""
    if opp is None:
        return [live], torch.zeros(G, 2, dtype=torch.long), torch.ones(2 * G, dtype=torch.bool)
    trained_seat = (torch.arange(G) // cfg["group_size"]) % 2               # (G,)
    other = torch.ones(G, dtype=torch.long)                                  # index of the other seat's policy
    if cfg["algo"] == "adalign" and not cfg["opponent"]:
        if snapshots:
            rundir.load_snapshot(opp_model, snapshots[int(torch.randint(len(snapshots), (1,), generator=gen))])
            other = (torch.rand(G, generator=gen) < cfg["buffer_prob"]).long()
        else:
            other = torch.zeros(G, dtype=torch.long)
        if fixed:
            pick = torch.randint(len(fixed), (G,), generator=gen)
            other = torch.where(torch.rand(G, generator=gen) < cfg["buffer_fixed_prob"], 2 + pick, other)
    seat_policy = torch.zeros(G, 2, dtype=torch.long)
    seat_policy[torch.arange(G), 1 - trained_seat] = other
    trained = torch.zeros(2 * G, dtype=torch.bool)
    trained[2 * torch.arange(G) + trained_seat] = True
    return [live, opp] + fixed, seat_policy, trained

# -----------------------------------------------------------------------------

def main(argv):
    # setup. config: the defaults < on --resume, the checkpoint's < the command line; then the game's defaults;
    #    under torchrun, which process this is (one GPU each)
    cfg = parse_args(argv, defaults(), __doc__.split("Each iteration")[0], __file__)
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    rank, world, rank_dev = devices.setup_distributed()
    ckpt = os.path.join(cfg["out_dir"], "ckpt")
    cfg, state = rundir.resume_config(cfg, given, ckpt, rank, world, device) if cfg["resume"] else (cfg, None)
    start = state["iter"] if state else 0
    cfg = resolve(cfg, given, world)
    if rank_dev and cfg["device"] in ("auto", "cuda"):
        cfg["device"] = rank_dev
    cfg["device"], cfg["dtype"] = devices.pick_device_dtype(cfg["device"], cfg["dtype"], exists=not cfg["dry_run"])
    dev, dt = cfg["device"], cfg["dtype"]
    torch.manual_seed(cfg["seed"])
    # setup. what each process will hold, before any weights load: --dry_run prints it and stops; a run that cannot
    #    fit stops with it
    if memory.plan(cfg, ckpt if state else cfg["model_name"], world, rank):
        return
    # setup. the policy (--fsdp: whole in host memory, then sharded, and a full copy gathered for the rollout); the
    #    other seat's policies and the KL term's frozen initial model, before out_dir is touched (a bad --opponent
    #    leaves no run directory behind); the run directory; the optimizer
    home, bf16 = ("cpu" if cfg["fsdp"] else dev), cfg["fsdp"] and dt == "bfloat16"
    try:
        model, tok = load_dir(ckpt, home, torch.float32) if state else load_model(cfg["model_name"], home, torch.float32)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    if cfg["fsdp"]:
        devices.shard(model, dev, world, cfg["fsdp_offload"], bf16)
    opp, opp_model, fixed = setup_opponents(cfg, tok, dev, ckpt if state else None)
    ref_model = None
    if cfg["kl_coef"] > 0:
        ref_model = load_model(cfg["model_name"], home, torch.float32)[0].eval().requires_grad_(False)
    if cfg["fsdp"]:                                                     # frozen copies as the policy computes
        opp_model, ref_model = (m and devices.as_computed(m, bf16) for m in (opp_model, ref_model))
        if ref_model is not None:                                       # (the opponent decodes: whole)
            devices.shard(ref_model, dev, world, cfg["fsdp_offload"])
    player = devices.rollout_copy(model, dev, bf16) if cfg["fsdp"] else model    # what the rollout decodes
    if rank == 0:                                                       # process 0 prints, logs and saves
        print("config: " + json.dumps(cfg))
    log = rundir.open_run(cfg, sum(p.numel() for p in model.parameters()), start, rank, world)
    devices.use_cpu_threads()
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16) if dt == "bfloat16" else nullcontext()
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    snapshots = rundir.resume_optimizer(model, opt, state, cfg, ckpt, rank) if state else []
    live, G, game = LMPolicy(player, tok, "live"), cfg["n_games"], envs.GAMES[cfg["env"]]
    local = range(rank * G // world, (rank + 1) * G // world)          # this process's games
    rows = slice(2 * local.start, 2 * local.stop)                      # and their trajectories
    for it in range(start, cfg["max_iters"]):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + it)
        # 1. who plays which seat: the trained seat alternates by group; the other is self, a snapshot (loaded into
        #    opp_model here) or a fixed strategy
        policies, seat_policy, trained = assign_seats(G, cfg, live, opp, fixed, opp_model, snapshots, gen)
        # 2. play
        model.eval()
        t_roll = time.time()
        with autocast, tqdm(total=cfg["n_rounds"] * game.turns_per_round, desc=f"iter {it}", leave=False,
                            dynamic_ncols=True, disable=rank > 0) as bar:
            ro = rollout(cfg["env"], policies, seat_policy, G, seed=cfg["seed"] * 1_000_003 + it,
                         group_size=cfg["group_size"], n_rounds=cfg["n_rounds"], temperature=cfg["temperature"],
                         constrained=cfg["constrained"], max_msg_tokens=cfg["max_msg_tokens"], progress=bar,
                         local=local, cuda_graph=cfg["cuda_graph"] and dev.startswith("cuda"))
        t_roll = time.time() - t_roll
        # 3. advantages and credits, over every process's games
        rewards = devices.gather_rows(ro.rewards, world, dev)           # (2G, T)
        keep = devices.gather_rows(torch.tensor([g.failed_replies == 0 for g in ro.games]).repeat_interleave(2), world, dev)
        credit, _ = compute_credits(rewards, trained, cfg, keep)        # a game an API failed in is left out
        # 4. one optimizer step (the gradients summed over the processes), unless most games were left out
        model.train()
        t_upd = time.time()
        stats = (update(model, ref_model, opt, ro, credit[rows], trained[rows], cfg, autocast, world)
                 if keep.float().mean() >= 0.5 else dict(loss=0.0, n_tok=0, skipped="most games' API replies failed"))
        if cfg["fsdp"] and not stats["skipped"]:
            devices.gather_into(player, model)                          # the rollout's copy, updated
        t_upd = time.time() - t_upd
        # 5. the AA agent buffer: a snapshot of the policy every buffer_interval iterations
        if cfg["algo"] == "adalign" and not cfg["opponent"] and (it + 1) % cfg["buffer_interval"] == 0:
            snapshots = rundir.push_snapshot(player, cfg, it + 1, snapshots, rank, world)
        # 6. log (process 0) and checkpoint (the others wait for it)
        dt_it = time.time() - t0
        invalid = devices.gather_rows(ro.invalid, world, dev)
        play = devices.gather_rows(readout(ro, cfg["env"]), world, dev)
        n_tokens = int(devices.all_sum(torch.tensor([int(ro.length.sum())], device=dev), world).item())
        save_now = (it + 1) % cfg["ckpt_interval"] == 0 or it + 1 == cfg["max_iters"]
        whole = devices.full_state(model, opt) if save_now else None    # every process takes part; process 0 gets it
        if rank == 0:
            m = rundir.metrics(rewards, invalid, play, trained, cfg["env"])
            rec = dict(iter=it, env=cfg["env"], **m, **stats, failed_games=int((~keep[0::2]).sum()), time=dt_it,
                       rollout_s=t_roll, update_s=t_upd, tokens=n_tokens, tok_per_s=n_tokens / dt_it,
                       threads=torch.get_num_threads(),  # a CPU's sums, so the sampled text, can depend on the threads
                       **memory.measured(model, opt, dev))              # this process's bytes, against the dry run's
            if save_now and game.memory_one:
                model.eval()
                rec["memory_one"] = memory_one(live)                    # P(C) at opening, CC, CD, DC, DD
                rec["best_response"] = envs.ipd_best_response(rec["memory_one"])  # exploiter / policy per round
            rundir.write_log(log, rec, game.readout)                    # to log.jsonl, and a line to read
            if save_now:
                rundir.save_checkpoint(model, tok, whole, it + 1, cfg, snapshots, ckpt)
        del whole                                                       # (process 0: the whole state, gathered)
        if save_now and world > 1:
            dist.barrier()
    rundir.close_run(log, cfg, rank)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)          # `kill PID` stops a background run like Ctrl-C does
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("\n" + rundir.stop_line(parse_args(sys.argv[1:], defaults())["out_dir"]))
