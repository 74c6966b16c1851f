"""
train.py: fine-tune a small LLM to play a social dilemma with Advantage Alignment (or naive REINFORCE,
or the sum-of-rewards oracle), a group-relative leave-one-out baseline, and full fine-tuning.

    python train.py --env ipd                       # the embedded SmolLM2-135M-Instruct, on a CPU
    python train.py --env ipd --algo naive          # plain policy gradient, self-play
    python train.py --env ipd --algo naive --opponent out/ckpt    # exploit a frozen policy
    python train.py --preset paper --env tas        # the paper's settings (a GPU)
    python train.py --help                          # every knob with its default

Each iteration: play n_games (rollout.py) -> advantages and credits (advantage.py) -> one optimizer step
of the token-level REINFORCE loss -> one log line -> a checkpoint every ckpt_interval iterations.
Simplifications against the released code, on purpose:
  1. Full fine-tuning of a small model instead of LoRA on a 7B model.
  2. Constrained decoding of actions, trained with the same masked policy (on-policy); free text for messages.
  3. The loss averages over decision tokens: tokens forced by the action format (one legal choice) have
     log-prob 0 under the masked policy and carry no gradient, so they are not counted.
  4. All randomness of iteration i derives from (seed, i), so --resume continues the same stream.
"""
import ast
import atexit
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import advantage
import envs
from load import check_device, load_dir, load_model, save_pretrained
from rollout import FixedPolicy, LMPolicy, claim_means, claims, cooperation, memory_one, rollout

# -----------------------------------------------------------------------------
# config: every knob, with its default. Override with --key value or --key=value.
env = "ipd"               # ipd | split | tas | tas_silent (tas without messages)
model_name = "smollm2-135m"  # embedded model, a HF checkpoint dir, or a HF repo id (needs a hub)
out_dir = "out"           # checkpoints and log.jsonl go here
resume = False            # continue from out_dir/ckpt (knobs given on the command line override the checkpoint's)
overwrite = False         # a fresh run may replace the run already in out_dir
max_iters = 30            # training iterations
ckpt_interval = 10        # checkpoint every this many iterations (and at the end)
seed = 0
# games
n_games = 0               # games per iteration (2 trajectories each); 0 = the env's CPU default (ipd 16, split/tas 4)
n_rounds = 10             # rounds per game (never told to the players)
group_size = 0            # games sharing an environment seed; 0 = the env's default (ipd 1, split/tas 8), or all when fewer
max_msg_tokens = 16       # sampled tokens of a TAS message after its (fed) start tag, end tag included; the paper: 128
temperature = 1.0         # sampling temperature during training
constrained = True        # constrained decoding of actions (SPEC 3.7)
cuda_graph = True         # on a GPU, replay long decode turns (messages) as CUDA graphs (H200: TAS rollout ~3x faster); no effect on a CPU
# algorithm
algo = "adalign"          # adalign | naive | sum
jit = False               # AA's "jit" form (k <= t, no extra gamma) instead of the released one
beta = -1.0               # AA strength; -1 = the env's default (ipd 0.5, split 1.0, tas 2.0)
gamma = -1.0              # discount; -1 = the env's default (0.9, 0.9, 0.96)
reward_scale = -1.0       # rewards are multiplied by this; -1 = the env's default (1/5, 1/100, 1/100)
entropy_coef = -1.0       # entropy bonus; -1 = default (0.01 for ipd adalign, else 0)
kl_coef = -1.0            # k3 KL to the initial model; -1 = default (0.001 for split/tas, else 0)
opponent = ""             # train one seat against this fixed strategy (envs.py) or frozen checkpoint dir
buffer_interval = 10      # AA agent buffer: snapshot the policy every this many iterations
buffer_size = 4           # AA agent buffer: snapshots kept (bf16, on disk in out_dir/snapshots)
buffer_prob = 0.5         # AA: probability that a game's opponent is a past snapshot (else the live policy)
buffer_fixed = "auto"     # AA: fixed strategies mixed into the agent buffer ("defector,random"; "" none; auto: ipd defector, else none)
buffer_fixed_prob = -1.0  # AA: probability that a game's opponent is one of buffer_fixed (-1: ipd 0.125, else 0)
# optimization
lr = 1e-5                 # Adam learning rate (full fine-tuning)
weight_decay = 0.0
grad_clip = 1.0           # max gradient norm
skip_no_signal = True     # skip the step when every credit is 0: Adam would turn a tiny entropy/KL gradient into a full step
micro_tokens = 0          # tokens per forward/backward; 0 = per device (CPU 2560: ~1.5 GB per 1000 tokens of SmolLM2 in fp32)
device = "auto"           # auto | cpu | cuda | cuda:1 ...
dtype = "auto"            # auto (cuda: bfloat16, cpu: float32) | float32 | bfloat16: autocast dtype (weights stay fp32)
preset = ""               # "paper": the released hyperparameters (128/64 games, lr 3e-6) on Qwen2.5-1.5B (a GPU)
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]

def defaults():
    """The knobs above with their defaults: a fresh dict, for parse_args to fill in."""
    return {k: globals()[k] for k in CONFIG_KEYS}

ENV_DEFAULTS = {  # SPEC 3: beta, gamma, reward scale, group size, KL; n_games: ours for a CPU (the paper: 128 / 64)
    "ipd": dict(beta=0.5, gamma=0.9, reward_scale=1 / 5, group_size=1, kl_coef=0.0, n_games=16,
                buffer_fixed="defector", buffer_fixed_prob=0.125),
    "split": dict(beta=1.0, gamma=0.9, reward_scale=1 / 100, group_size=8, kl_coef=0.001, n_games=4,
                  buffer_fixed="", buffer_fixed_prob=0.0),
    "tas": dict(beta=2.0, gamma=0.96, reward_scale=1 / 100, group_size=8, kl_coef=0.001, n_games=4,
                buffer_fixed="", buffer_fixed_prob=0.0),
}
ENV_DEFAULTS["tas_silent"] = ENV_DEFAULTS["tas"]
PRESETS = {"paper": dict(lr=3e-6, max_iters=1000, model_name="Qwen/Qwen2.5-1.5B-Instruct", max_msg_tokens=128,
                         n_games={"ipd": 128, "split": 64, "tas": 64, "tas_silent": 64})}

def config_help():
    """The config block above, read from this file: one `--name  default  comment` line per knob."""
    src = open(__file__).read().split("# config:")[1].split("# ---")[0].splitlines()[1:]   # [0]: the header's rest
    out = []
    for line in src:
        if "=" in line and not line.startswith("#"):
            name, rest = line.split("=", 1)
            value, _, comment = rest.partition("#")                       # no default contains a '#'
            out.append(f"  --{name.strip():<18} {value.strip():<16} {comment.strip()}".rstrip())
    return "\n".join(out)

def parse_args(argv, cfg):
    """--key value / --key=value over the config globals, type-checked against the defaults."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("Each iteration")[0] + "knobs (default):\n" + config_help())
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            sys.exit(f"error: expected --key value, got {arg!r} (see --help)")
        key, val = arg[2:].split("=", 1) if "=" in arg else (arg[2:], None)
        if val is None:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                val = "True" if isinstance(cfg.get(key), bool) else None   # a bare --resume means True
                if val is None:
                    sys.exit(f"error: --{key} needs a value (see --help)")
            else:
                i += 1
                val = argv[i]
        i += 1
        if key not in cfg:
            sys.exit(f"error: unknown config key --{key} (see --help for the list)")
        default = cfg[key]
        try:
            new = ast.literal_eval(val) if not isinstance(default, str) else val
        except (ValueError, SyntaxError):
            new = {"true": True, "false": False}.get(val.lower(), val) if isinstance(default, bool) else val
        if isinstance(default, bool) and not isinstance(new, bool):
            sys.exit(f"error: --{key} wants true or false, got {val!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(new, bool) or not isinstance(new, (int, float)) or (isinstance(default, int) and not isinstance(new, int)):
                sys.exit(f"error: --{key} wants a {type(default).__name__}, got {val!r}")
            new = type(default)(new)
        cfg[key] = new
    return cfg

def resolve(cfg, given=()):
    """Fill the per-env defaults, apply a preset (to the knobs not given on the command line), check values."""
    if cfg["env"] not in envs.GAMES:
        sys.exit(f"error: --env must be one of {', '.join(envs.GAMES)}, got {cfg['env']!r}")
    if cfg["algo"] not in ("adalign", "naive", "sum"):
        sys.exit(f"error: --algo must be adalign, naive or sum, got {cfg['algo']!r}")
    if cfg["preset"]:
        if cfg["preset"] not in PRESETS:
            sys.exit(f"error: unknown --preset {cfg['preset']!r}: choose {', '.join(PRESETS)}")
        for k, v in PRESETS[cfg["preset"]].items():
            if k not in given:                                          # --preset paper --model_name X keeps X
                cfg[k] = v[cfg["env"]] if isinstance(v, dict) else v
    d = dict(ENV_DEFAULTS[cfg["env"]], entropy_coef=0.01 if cfg["env"] == "ipd" and cfg["algo"] == "adalign" else 0.0)
    for k in ("beta", "gamma", "reward_scale", "kl_coef", "buffer_fixed_prob", "entropy_coef"):
        if cfg[k] == -1:                                                # -1 is the only "default" value
            cfg[k] = d[k]
        elif cfg[k] < 0:
            sys.exit(f"error: --{k} must be -1 (the env's default) or >= 0, got {cfg[k]}")
    if cfg["buffer_fixed"] == "auto":
        cfg["buffer_fixed"] = d["buffer_fixed"]
    for k in ("n_games", "group_size"):
        if cfg[k] < 0:
            sys.exit(f"error: --{k} must be 0 (the env's default) or positive, got {cfg[k]}")
    cfg["n_games"] = cfg["n_games"] or d["n_games"]
    cfg["group_size"] = cfg["group_size"] or min(d["group_size"], cfg["n_games"])  # fewer games: one group of all
    if cfg["micro_tokens"] < 0:
        sys.exit(f"error: --micro_tokens must be 0 (per device) or positive, got {cfg['micro_tokens']}")
    for k in ("n_games", "n_rounds", "max_iters", "ckpt_interval", "buffer_interval", "buffer_size", "max_msg_tokens"):
        if cfg[k] < 1:
            sys.exit(f"error: --{k} must be at least 1, got {cfg[k]}")
    if cfg["n_games"] % cfg["group_size"]:
        sys.exit(f"error: n_games ({cfg['n_games']}) must be a multiple of group_size ({cfg['group_size']})")
    if cfg["gamma"] > 1 or cfg["lr"] <= 0 or cfg["temperature"] <= 0:    # gamma 0: each round's credit is its own
        sys.exit("error: need 0 <= gamma <= 1, lr > 0 and temperature > 0")
    for k in ("buffer_prob", "buffer_fixed_prob"):
        if not 0 <= cfg[k] <= 1:
            sys.exit(f"error: --{k} must be between 0 and 1, got {cfg[k]}")
    bad = [n for n in cfg["buffer_fixed"].split(",") if n and n not in envs.STRATEGIES[cfg["env"]]]
    if bad:
        sys.exit(f"error: --buffer_fixed: {', '.join(bad)} not {cfg['env']} strategies "
                 f"({', '.join(envs.STRATEGIES[cfg['env']])})")
    return cfg

def use_cpu_threads():
    """Every core unless OMP_NUM_THREADS says otherwise (torch's own default may be fewer). The thread count can
    change a CPU's sums, so the sampled text: runs that should replay each other set the same count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))

def pick_device_dtype(dev, dt):
    """CUDA when present. dtype auto: bf16 autocast on CUDA, fp32 on a CPU. Not a speed test: the dtype
    changes what is learned (MEASURED.md), so a CPU run gives the same numbers on any CPU unless
    --dtype bfloat16 is asked for (faster on CPUs with bf16 instructions; its own results)."""
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(dev)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if dt == "auto":
        dt = "bfloat16" if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dt not in ("float32", "bfloat16"):
        sys.exit(f"error: --dtype must be auto, float32 or bfloat16, got {dt!r}")
    return dev, dt

# -----------------------------------------------------------------------------
# ALGO LOGIC: from a rollout to the token-level loss

def token_credits(ro, C):
    """Per-round credits C (N, T) -> per-token credits (N, L), zero where the token is not trained."""
    return torch.where(ro.action_mask, C.gather(1, ro.token_round.clamp(min=0)), 0.0)

def compute_credits(rewards, trained, cfg):
    """Advantages of every trajectory (own baseline per group and player), then each algorithm's credit.
    rewards (N, T) of all the games (rows 2g, 2g+1: game g's seats); trained (N,) bool: rows whose tokens get
    gradient. Player id = (trained or not, seat): a frozen opponent never shares a baseline with the trained
    policy. -> credits (N, T), advantages (N, T)."""
    seat, group = torch.arange(rewards.size(0)) % 2, torch.arange(rewards.size(0)) // 2 // cfg["group_size"]
    player = (~trained).long() * 2 + seat
    A = advantage.advantages(rewards, cfg["gamma"], group, player, cfg["reward_scale"])
    A_opp = A[torch.arange(A.size(0)) ^ 1]           # rows 2g and 2g+1 are the two seats of game g
    return advantage.credits(cfg["algo"], A, A_opp, cfg["beta"], cfg["gamma"], cfg["jit"]), A

def shared_prefix(ids, mask):
    """Length of the token prefix all rows share (the system prompt and game intro) before any scored token.
    Found here rather than taken from the rollout, which shares only the intro: in the IPD the first round's
    prompt and the action's forced '<' are the same for every row too, so this prefix is longer."""
    if ids.size(0) < 2:
        return 0
    differ = (ids != ids[:1]).any(0) | mask.any(0)                   # (L,)
    return int(differ.nonzero()[0]) if differ.any() else 0

def micro_batches(rows, length, max_tokens):
    """Split rows into consecutive micro-batches of at most max_tokens padded tokens (at least one row)."""
    out, cur, L = [], [], 0                                             # L: the longest row in cur
    for r in rows:
        if cur and (len(cur) + 1) * max(L, int(length[r])) > max_tokens:
            out.append(cur)
            cur, L = [], 0
        cur.append(r)
        L = max(L, int(length[r]))
    return out + [cur] if cur else out

def micro_batch_tokens(cfg, model):
    """Tokens per forward/backward: --micro_tokens, or 0 = per device: 2560 on a CPU (~4 GB of activations
    for SmolLM2 in fp32), on CUDA what half the free memory holds (~4 bytes x (8 x n_embd + 5 x n_hidden)
    per token and layer, an estimate), between 512 and 65536."""
    if cfg["micro_tokens"] > 0:
        return cfg["micro_tokens"]
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return 2560
    c = model.cfg
    per_token = 4 * c.n_layer * (8 * c.n_embd + 5 * c.n_hidden)
    return int(min(max(0.5 * torch.cuda.mem_get_info(dev)[0] / per_token, 512), 65536))

def update(model, ref_model, opt, ro, credit, trained, cfg, autocast, world=1):
    """One optimizer step of L = -(1/N) sum C log pi - ent * H + kl * k3, over decision tokens of the
    trained rows, in micro-batches. Returns stats; skips the step if the loss or grads are not finite
    or if there is no signal: all credits 0 (with skip_no_signal; otherwise only when the entropy and KL
    terms are off too). Adam normalizes a gradient's scale away, so a step driven by the entropy bonus
    alone moves the weights as far as a real one."""
    tok_credit = token_credits(ro, credit)                              # (N, L)
    decision = ro.decision & trained[:, None]                          # (N, L)
    dev = next(model.parameters()).device
    # the loss is a mean over every process's decision tokens; the ranks agree on skipping
    counts = all_sum(torch.tensor([decision.sum().item(), tok_credit[decision].abs().gt(0).sum().item()],
                                  dtype=torch.float64, device=dev), world).tolist()
    n_tok = int(counts[0])
    stats = dict(loss=0.0, entropy=0.0, kl=0.0, n_tok=n_tok, skipped="")
    no_credit = counts[1] == 0
    if n_tok == 0 or no_credit and (cfg["skip_no_signal"] or cfg["entropy_coef"] == cfg["kl_coef"] == 0):
        stats["skipped"] = "no signal"
        return stats
    opt.zero_grad(set_to_none=True)
    total = torch.zeros(3, device=dev)                                  # loss, entropy, kl sums: read once, at the end
    for mb in micro_batches(trained.nonzero().flatten().tolist(), ro.length, micro_batch_tokens(cfg, model)):
        L = int(ro.length[mb].max())
        sel = decision[mb, :L]                                          # (b, L) on the CPU: no device sync to test it
        if not sel.any():
            continue
        P = shared_prefix(ro.ids[mb, :L], sel)
        ids, mask, allowed = ro.ids[mb, :L].to(dev), sel.to(dev), ro.allowed[mb, :L][sel].to(dev)
        with autocast:
            logp, ent = model.token_logprobs(ids, mask, allowed, P, cfg["temperature"])
        c = tok_credit[mb, :L][sel].to(dev)
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
    if world > 1:                                                       # sum the gradients of all ranks
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    stats["loss"], stats["entropy"], stats["kl"] = all_sum(total, world).tolist()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    if not math.isfinite(stats["loss"]) or not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        stats["skipped"] = "non-finite loss or gradient"
        return stats
    opt.step()
    stats["grad_norm"] = norm.item()
    return stats

# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(model, tok, opt, it, cfg, snapshots, path):
    """out_dir/ckpt: the policy as a save_pretrained dir + state.pt. Written to ckpt.tmp (state.pt last, by
    rename, so a directory with state.pt is complete), then swapped in; find_checkpoint recovers a crash at
    any point. Ctrl-C waits until the swap is done."""
    tmp, old = path + ".tmp", path + ".old"
    with deferred_interrupt():
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_pretrained(model, tok, tmp)
            torch.save({"iter": it, "optimizer": opt.state_dict(), "config": cfg, "snapshots": snapshots},
                       os.path.join(tmp, "state.pt.part"))
        except (OSError, RuntimeError) as e:                    # e.g. the disk filled up
            shutil.rmtree(tmp, ignore_errors=True)
            sys.exit(f"error: could not write the checkpoint of iteration {it} to {tmp} ({e}); "
                     f"{path} still holds the previous one")
        os.replace(os.path.join(tmp, "state.pt.part"), os.path.join(tmp, "state.pt"))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

def find_checkpoint(path):
    """The complete checkpoint at path, after finishing a swap a crash interrupted (ckpt.tmp complete: it is
    the newer one; else ckpt.old). -> path, or None if there is none."""
    done = lambda d: os.path.exists(os.path.join(d, "state.pt"))
    if not done(path):
        for d in (path + ".tmp", path + ".old"):
            if done(d):
                shutil.rmtree(path, ignore_errors=True)
                os.replace(d, path)
                break
    return path if done(path) else None

@contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) and kill (SIGTERM) until the block ends, then raise KeyboardInterrupt: a save is
    never left half done. A signal started ignored (SIGINT under `nohup ... &`) stays ignored."""
    hit, prev = [], {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                prev[sig] = signal.signal(sig, lambda *a: hit.append(1))
    except ValueError:                     # not the main thread (e.g. under a test runner): nothing to hold
        pass
    try:
        yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)
        if hit:
            raise KeyboardInterrupt

def prepare_out_dir(cfg, n_params, start):
    """Check out_dir before any training: writable, enough free space for two checkpoints, not used by another
    run (a lock file with our pid), not holding an old run unless resumed or --overwrite. On resume, cut
    log.jsonl back to the checkpoint's iteration. -> the open log file."""
    d = cfg["out_dir"]
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, ".write_test")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: out_dir {d} is not writable ({e.strerror or e}): pick another --out_dir")
    need = 2 * 12 * n_params + (1 << 28)                        # fp32 weights + Adam's two moments, twice, + slack
    free = shutil.disk_usage(d).free
    if free < need:
        sys.exit(f"error: out_dir {d} has {free / 2**30:.1f} GiB free; a checkpoint swap needs ~{need / 2**30:.1f} GiB")
    lock = os.path.join(d, "lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(open(lock).read().strip() or 0)
            if pid == os.getpid():                                  # our own, from an earlier main() in this process
                raise ProcessLookupError
            os.kill(pid, 0)                                         # raises if no such process
            sys.exit(f"error: out_dir {d} is in use by a running train.py (pid {pid}); pick another --out_dir")
        except (ValueError, ProcessLookupError):                    # a stale lock from a run that died: take it
            os.remove(lock)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except PermissionError:
            sys.exit(f"error: out_dir {d} is locked by another user's run ({lock})")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    atexit.register(lambda: os.path.exists(lock) and open(lock).read() == str(os.getpid()) and os.remove(lock))
    log_path = os.path.join(d, "log.jsonl")
    if not cfg["resume"]:
        old = [f for f in ("log.jsonl", "ckpt", "snapshots") if os.path.exists(os.path.join(d, f))
               and not (f == "log.jsonl" and os.path.getsize(os.path.join(d, f)) == 0)]   # an empty log: no run
        if old and not cfg["overwrite"]:
            what = (f"already holds a run ({', '.join(old)}): add --resume to continue it, " if "ckpt" in old else
                    f"holds a run stopped before its first checkpoint ({', '.join(old)}): ")
            sys.exit(f"error: out_dir {d} {what}--overwrite true to replace it, or pick another --out_dir")
        for f in old:
            p = os.path.join(d, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    elif os.path.exists(log_path):                                  # lines logged after the checkpoint are redone
        keep = []
        for line in open(log_path):
            try:
                if json.loads(line)["iter"] < start:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass
        with open(log_path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log_path + ".tmp", log_path)
    return open(log_path, "a")

FIXED_ON_RESUME = ("env", "model_name", "n_rounds")    # what the checkpoint's policy and log are about

def resume_config(cfg, given, ckpt, rank, world):
    """--resume: the checkpoint's config, overridden by the knobs given on the command line (except
    FIXED_ON_RESUME). The device is this machine's; the dtype stays the run's unless given, since it changes
    what is learned (a bf16 run resumed in fp32 would be another run). -> (cfg, state)."""
    if rank == 0:
        find_checkpoint(ckpt)                                           # may finish a swap a crash interrupted
    if world > 1:
        dist.barrier()
    if not find_checkpoint(ckpt):
        sys.exit(f"error: --resume but no checkpoint at {ckpt}")
    state = load_state(ckpt)
    old = state["config"]
    missing = sorted(set(cfg) - set(old))                               # knobs added after that checkpoint
    if missing:
        print(f"resume: the checkpoint predates {', '.join(missing)}: using the current values")
    for k in FIXED_ON_RESUME:
        if k in given and k in old and cfg[k] != old[k]:
            sys.exit(f"error: --{k} {cfg[k]} differs from the checkpoint's {old[k]!r}: a resumed run keeps it "
                     "(start a new run in another --out_dir to change it)")
    changed = [k for k in given if k in old and k not in ("resume", "device") and cfg[k] != old[k]]
    if changed:
        print("resume: the command line changes " + ", ".join(f"{k} {old[k]!r} -> {cfg[k]!r}" for k in changed))
    cfg = {**cfg, **{k: v for k, v in old.items() if k in cfg and k not in given}, "out_dir": cfg["out_dir"]}
    if "device" not in given:                                           # the machine decides the device
        cfg["device"] = globals()["device"]
    if "dtype" not in given:
        print(f"resume: dtype {cfg['dtype']}, as the checkpoint's run (--dtype changes it)")
    return cfg, state

def resume_optimizer(opt, state, cfg, ckpt, say):
    """--resume: Adam's state from the checkpoint (at the config's lr and weight decay) and the agent buffer's
    snapshots still on disk. -> the snapshot paths."""
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {ckpt}/state.pt: the optimizer state does not fit this model ({e})")
    for group in opt.param_groups:                                      # a resumed run takes the config's lr
        group["lr"], group["weight_decay"] = cfg["lr"], cfg["weight_decay"]
    listed = [os.path.join(cfg["out_dir"], "snapshots", os.path.basename(f)) for f in state["snapshots"]]
    snapshots = [f for f in listed if os.path.exists(f)]
    if len(snapshots) < len(listed):
        say(f"resume: {len(listed) - len(snapshots)} of the agent buffer's {len(listed)} snapshots are missing "
            f"from {cfg['out_dir']}/snapshots: the buffer goes on without them")
    return snapshots

def load_state(ckpt):
    """ckpt/state.pt -> dict, or exit with one line saying the file is damaged."""
    f = os.path.join(ckpt, "state.pt")
    try:
        state = torch.load(f, weights_only=True)
        assert isinstance(state, dict) and {"iter", "optimizer", "config", "snapshots"} <= set(state)
        return state
    except Exception as e:                   # pickle, zip and truncation errors all mean the same thing here
        sys.exit(f"error: {f} is damaged or not a train.py checkpoint ({type(e).__name__}): "
                 "restore it, or start a new run with --overwrite true")

def warn_other_game(path, env):
    """A policy trained on another game still plays this one (a legitimate transfer test): say so. Reads only
    the config of path/state.pt (mmap leaves Adam's state on disk); another kind of model directory, or an
    unreadable state.pt whose weights still loaded, says nothing."""
    try:
        other = torch.load(os.path.join(path, "state.pt"), weights_only=True, mmap=True)["config"]["env"]
    except Exception:
        return
    if other != env:
        print(f"note: {path} was trained on {other}; here it plays {env} (--env)", file=sys.stderr)

def snapshot_path(out_dir, it):
    return os.path.join(out_dir, "snapshots", f"iter{it:05d}.safetensors")

def save_snapshot(model, out_dir, it):
    from safetensors.torch import save_file
    f = snapshot_path(out_dir, it)
    os.makedirs(os.path.dirname(f), exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight" or not model.cfg.tie_embeddings}
    save_file(sd, f + ".tmp")
    os.replace(f + ".tmp", f)
    return f

def push_snapshot(model, cfg, it, snapshots, rank, world):
    """The agent buffer: add a snapshot of the policy after iteration it, drop the oldest beyond buffer_size
    (rank 0 writes and deletes; every rank waits until it is on disk). -> the kept snapshot paths."""
    kept = (snapshots + [snapshot_path(cfg["out_dir"], it)])[-cfg["buffer_size"]:]
    if rank == 0:
        save_snapshot(model, cfg["out_dir"], it)
        for f in set(snapshots) - set(kept):
            if os.path.exists(f):
                os.remove(f)
    if world > 1:
        dist.barrier()
    return kept

def load_snapshot(model, f):
    from safetensors.torch import load_file
    try:
        sd = load_file(f)
    except Exception as e:                   # missing, truncated or not safetensors: one line, not a traceback
        sys.exit(f"error: agent-buffer snapshot {f} is unreadable ({type(e).__name__}): delete it and --resume "
                 "(the buffer goes on without it)")
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k in sd:
                p.copy_(sd[k])

# -----------------------------------------------------------------------------
# opponents and seats

def setup_opponents(cfg, tok, dev, ckpt):
    """The other seat's policies: --opponent (a fixed strategy or a frozen checkpoint), or for AA the agent
    buffer's network (its weights swapped for a snapshot each iteration) plus its fixed strategies; naive and
    sum play themselves. -> (opponent policy or None, its network or None, [fixed buffer policies])."""
    env = cfg["env"]
    if cfg["opponent"] in envs.STRATEGIES[env]:
        return FixedPolicy(env, cfg["opponent"]), None, []
    if cfg["opponent"]:
        try:
            opp_model, opp_tok = load_model(cfg["opponent"], dev, torch.float32)
        except (OSError, RuntimeError, ValueError) as e:
            sys.exit(f"error: --opponent is neither one of the {env} strategies ({', '.join(envs.STRATEGIES[env])}) "
                     f"nor a loadable model: {e}")
        warn_other_game(cfg["opponent"], env)
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
            load_snapshot(opp_model, snapshots[int(torch.randint(len(snapshots), (1,), generator=gen))])
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
# several processes (torchrun): each plays its share of the games, one synchronized update

def setup_distributed():
    """Under torchrun: join the process group (NCCL with one GPU per rank when CUDA is present, else gloo).
    -> (rank, world size, this rank's device or None)."""
    if "RANK" not in os.environ:
        return 0, 1, None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, f"cuda:{local}"
    dist.init_process_group("gloo")
    return rank, world, "cpu"

def gather_rows(x, world, dev):
    """All ranks' (n, ...) tensors, stacked in rank order (every rank holds the same number of rows)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x, device=dev) for _ in range(world)]
    dist.all_gather(parts, x.to(dev))
    return torch.cat(parts).cpu()

def all_sum(x, world):
    """Sum a tensor over ranks, in place (a no-op in one process)."""
    if world > 1:
        dist.all_reduce(x)
    return x

# -----------------------------------------------------------------------------

def metrics(r, invalid, play, trained, cfg):
    """Per-round means of the iteration for the log line. r (N, T) rewards, invalid (N, T), play: IPD
    cooperation (N, T) or the Split/TAS claims (N, K, 2) of rollout.claims; all the games (every process's)."""
    seat = torch.arange(r.size(0)) % 2
    m = {"reward_seat0": r[seat == 0].mean().item(), "reward_seat1": r[seat == 1].mean().item(),
         "reward_trained": r[trained].mean().item(), "welfare": (r[0::2] + r[1::2]).mean().item(),
         "invalid": invalid[trained].float().mean().item()}
    if not trained.all():
        m["reward_opponent"] = r[~trained].mean().item()
    if cfg["env"] == "ipd":
        m["coop"] = play[trained].float().mean().item()
        m["coop_all"] = play.float().mean().item()
    else:
        m.update(claim_means(play[trained].sum(0), cfg["env"]))        # the trained seats' claims by situation
    return m

def main(argv):
    # 0. config: the defaults, the command line, on --resume the checkpoint's config under what was given;
    #    under torchrun, which rank this is
    cfg = parse_args(argv, defaults())
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    rank, world, rank_dev = setup_distributed()
    ckpt = os.path.join(cfg["out_dir"], "ckpt")
    cfg, state = resume_config(cfg, given, ckpt, rank, world) if cfg["resume"] else (cfg, None)
    start = state["iter"] if state else 0
    cfg = resolve(cfg, given)
    if cfg["n_games"] % (world * cfg["group_size"]):
        sys.exit(f"error: {world} processes need n_games ({cfg['n_games']}) to be a multiple of {world} x group_size "
                 f"({cfg['group_size']}): each plays whole groups")
    if rank_dev and cfg["device"] in ("auto", "cuda"):                 # torchrun: one GPU per rank
        cfg["device"] = rank_dev
    dev, dt = pick_device_dtype(cfg["device"], cfg["dtype"])
    cfg["device"], cfg["dtype"] = dev, dt
    torch.manual_seed(cfg["seed"])
    # 1. the policy, the run directory, the optimizer
    try:
        model, tok = load_dir(ckpt, dev, torch.float32) if state else load_model(cfg["model_name"], dev, torch.float32)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    # the other seat's policies and the KL term's frozen initial model, before out_dir is touched (a bad
    # --opponent leaves no run directory behind)
    opp, opp_model, fixed = setup_opponents(cfg, tok, dev, ckpt if state else None)
    ref_model = None
    if cfg["kl_coef"] > 0:
        ref_model = load_model(cfg["model_name"], dev, torch.float32)[0].eval().requires_grad_(False)
    say = print if rank == 0 else (lambda *a, **k: None)               # rank 0 prints, logs and saves
    say("config: " + json.dumps(cfg))
    log, err = None, [None]
    if rank == 0:
        try:
            log = prepare_out_dir(cfg, sum(p.numel() for p in model.parameters()), start)
        except SystemExit as e:
            err = [str(e)]
    if world > 1:
        dist.broadcast_object_list(err, src=0)                          # every rank stops if rank 0 cannot go on
    if err[0]:
        sys.exit(err[0])
    use_cpu_threads()
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16) if dt == "bfloat16" else nullcontext()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    snapshots = resume_optimizer(opt, state, cfg, ckpt, say) if state else []
    live = LMPolicy(model, tok, "live")
    G = cfg["n_games"]
    local = range(rank * G // world, (rank + 1) * G // world)          # this rank's games
    rows = slice(2 * local.start, 2 * local.stop)                      # and their trajectories
    turns = cfg["n_rounds"] * (3 if cfg["env"] == "tas" else 1)          # lockstep turns per game
    for it in range(start, cfg["max_iters"]):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + it)
        # 1. who plays which seat: the trained seat alternates by group; the other is self, a snapshot or fixed
        policies, seat_policy, trained = assign_seats(G, cfg, live, opp, fixed, opp_model, snapshots, gen)
        # 2. play
        model.eval()
        t_roll = time.time()
        with autocast, tqdm(total=turns, desc=f"iter {it}", leave=False, dynamic_ncols=True, disable=rank > 0) as bar:
            ro = rollout(cfg["env"], policies, seat_policy, G, seed=cfg["seed"] * 1_000_003 + it,
                         group_size=cfg["group_size"], n_rounds=cfg["n_rounds"], temperature=cfg["temperature"],
                         constrained=cfg["constrained"], max_msg_tokens=cfg["max_msg_tokens"], progress=bar,
                         local=local, cuda_graph=cfg["cuda_graph"] and dev.startswith("cuda"))
        t_roll = time.time() - t_roll
        # 3. credits over every rank's games, 4. update (gradients summed over the ranks)
        rewards = gather_rows(ro.rewards, world, dev)                   # (2G, T)
        credit, _ = compute_credits(rewards, trained, cfg)
        model.train()
        t_upd = time.time()
        stats = update(model, ref_model, opt, ro, credit[rows], trained[rows], cfg, autocast, world)
        t_upd = time.time() - t_upd
        # 5. agent buffer, log, checkpoint
        if cfg["algo"] == "adalign" and not cfg["opponent"] and (it + 1) % cfg["buffer_interval"] == 0:
            snapshots = push_snapshot(model, cfg, it + 1, snapshots, rank, world)
        dt_it = time.time() - t0
        invalid = gather_rows(ro.invalid, world, dev)
        play = gather_rows(cooperation(ro) if cfg["env"] == "ipd" else claims(ro, cfg["env"]), world, dev)
        n_tokens = int(all_sum(torch.tensor([int(ro.length.sum())], device=dev), world).item())
        save_now = (it + 1) % cfg["ckpt_interval"] == 0 or it + 1 == cfg["max_iters"]
        if rank > 0:                                                    # rank 0 logs and saves
            if save_now:
                dist.barrier()                                          # wait for its checkpoint
            continue
        m = metrics(rewards, invalid, play, trained, cfg)
        rec = dict(iter=it, **m, **stats, time=dt_it, rollout_s=t_roll, update_s=t_upd, tokens=n_tokens,
                   tok_per_s=n_tokens / dt_it, threads=torch.get_num_threads())  # a CPU's sums, so the sampled
                                                                                   # text, can depend on the threads
        if save_now and cfg["env"] == "ipd":
            model.eval()
            rec["memory_one"] = memory_one(live)                        # P(C) at opening, CC, CD, DC, DD
            rec["best_response"] = envs.ipd_best_response(rec["memory_one"])  # exploiter / policy reward per round
        log.write(json.dumps(rec) + "\n")
        log.flush()
        coop = f" coop {m['coop']:.2f}" if "coop" in m else ""
        coop += "".join(f" {k} {m[k]:.1f}" for k in envs.CLAIMS.get(cfg["env"], ()) if k in m)
        print(f"iter {it}: reward/round seat0 {m['reward_seat0']:.2f} seat1 {m['reward_seat1']:.2f} trained "
              f"{m['reward_trained']:.2f} | welfare {m['welfare']:.2f}{coop} | invalid {m['invalid']:.2f} | "
              f"loss {stats['loss']:.4f}{' SKIPPED (' + stats['skipped'] + ')' if stats['skipped'] else ''} | "
              f"{dt_it:.1f}s (rollout {t_roll:.1f}, update {t_upd:.1f}) {n_tokens / dt_it:.0f} tok/s", flush=True)
        if save_now:
            save_checkpoint(model, tok, opt, it + 1, cfg, snapshots, ckpt)
            if world > 1:
                dist.barrier()
    if rank == 0:
        log.close()
        os.remove(os.path.join(cfg["out_dir"], "lock"))
    if world > 1:
        dist.destroy_process_group()

def stop_line(argv):
    """The line a stopped run ends with: whether its out_dir holds a checkpoint to --resume from."""
    d = parse_args(argv, defaults())["out_dir"]
    if find_checkpoint(os.path.join(d, "ckpt")):
        return f"interrupted: the last checkpoint, {d}/ckpt, is intact; continue with the same command and --resume"
    return (f"interrupted before the first checkpoint (one every --ckpt_interval iterations): {d} holds nothing "
            "to resume; start again with --overwrite true")

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)          # `kill PID` stops a background run like Ctrl-C does
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("\n" + stop_line(sys.argv[1:]))
