"""
rundir.py: a training run's directory (out_dir), which one run owns. What is in it and the rules that keep it
safe, so that train.py can stay the method:

    out_dir/lock                 the pid of the run using it (a second run into it stops with one line)
    out_dir/log.jsonl            one JSON line per iteration (cut back to the checkpoint on --resume)
    out_dir/ckpt/                the policy as a Hugging Face directory + state.pt (iteration, Adam, config,
                                 the agent buffer's snapshot list); written to ckpt.tmp and swapped in, so a
                                 crash at any point leaves one complete checkpoint (find_checkpoint)
    out_dir/snapshots/           the AA agent buffer: past policies in bf16

A fresh run into a used out_dir needs --overwrite true; --resume continues it (the checkpoint's config, under
the knobs given on the command line). Ctrl-C and kill wait for a checkpoint being written.
"""
import atexit
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

import devices
from load import save_pretrained
from rollout import readout_means

# -----------------------------------------------------------------------------
# the directory and its lock

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
            pid = int(open(lock).read().strip())                    # empty: a run killed before writing it
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
        try:
            with open(log_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(log_path + ".tmp", log_path)
        except OSError as e:
            if os.path.isfile(log_path + ".tmp"):
                os.remove(log_path + ".tmp")
            sys.exit(f"error: could not rewrite {log_path} ({e.strerror or e}): it and the checkpoint are kept as they were")
    return open(log_path, "a")

def open_run(cfg, n_params, start, rank=0, world=1):
    """Process 0 takes out_dir (prepare_out_dir) -> the open log.jsonl (None on the other processes); if it
    cannot, every process stops with its one line."""
    log, err = None, [None]
    if rank == 0:
        try:
            log = prepare_out_dir(cfg, n_params, start)
        except SystemExit as e:
            err = [str(e)]
    if world > 1:
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        sys.exit(err[0])
    return log

def metrics(r, invalid, play, trained, env):
    """Per-round means of the iteration, over every process's games: r (N, T) rewards, invalid (N, T), play: the
    game's readout (N, T, K, 2) of rollout.readout (IPD cooperation, Split / TAS claims by situation)."""
    seat = torch.arange(r.size(0)) % 2
    m = {"reward_seat0": r[seat == 0].mean().item(), "reward_seat1": r[seat == 1].mean().item(),
         "reward_trained": r[trained].mean().item(), "welfare": (r[0::2] + r[1::2]).mean().item(),
         "invalid": invalid[trained].float().mean().item()}
    if not trained.all():                                               # the other seat: its reward, its invalid moves
        m["reward_opponent"], m["invalid_opponent"] = r[~trained].mean().item(), invalid[~trained].float().mean().item()
    return {**m, **readout_means(play[trained].sum((0, 1)), env)}     # the trained seats' readout

def write_log(log, rec, readout=()):
    """One iteration: its JSON line in log.jsonl, then a line on the terminal (readout: the game's keys to show)."""
    try:
        log.write(json.dumps(rec) + "\n")
        log.flush()
    except OSError as e:
        sys.exit(f"error: could not write {log.name} ({e.strerror or e}): its earlier lines and the last checkpoint "
                 "are kept")
    show = "".join(f" {k} {rec[k]:.2f}" for k in readout if k in rec)
    skipped = f" SKIPPED ({rec['skipped']})" if rec["skipped"] else ""
    left_out = f" | {rec['failed_games']} games left out (API failures)" if rec.get("failed_games") else ""
    print(f"iter {rec['iter']}: reward/round seat0 {rec['reward_seat0']:.2f} seat1 {rec['reward_seat1']:.2f} trained "
          f"{rec['reward_trained']:.2f} | welfare {rec['welfare']:.2f}{show} | invalid {rec['invalid']:.2f} | "
          f"loss {rec['loss']:.4f}{skipped}{left_out} | {rec['time']:.1f}s (rollout {rec['rollout_s']:.1f}, update "
          f"{rec['update_s']:.1f}) {rec['tok_per_s']:.0f} tok/s", flush=True)

def close_run(log, cfg, rank=0):
    """The run ended: close its log and free out_dir."""
    if rank == 0:
        log.close()
        os.remove(os.path.join(cfg["out_dir"], "lock"))

def stop_line(d):
    """The line a stopped run ends with: whether its out_dir d holds a checkpoint to --resume from."""
    if find_checkpoint(os.path.join(d, "ckpt")):
        return f"interrupted: the last checkpoint, {d}/ckpt, is intact; continue with the same command and --resume"
    return (f"interrupted before the first checkpoint (one every --ckpt_interval iterations): {d} holds nothing "
            "to resume; start again with --overwrite true")

# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(model, tok, state, it, cfg, snapshots, path):
    """out_dir/ckpt: the policy as a save_pretrained dir + state.pt. state: devices.full_state's (weights, Adam
    state by parameter name), whole however the run was sharded. Written to ckpt.tmp (state.pt last, by
    rename, so a directory with state.pt is complete), then swapped in; find_checkpoint recovers a crash at
    any point. Ctrl-C waits until the swap is done."""
    tmp, old = path + ".tmp", path + ".old"
    with deferred_interrupt():
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_pretrained(model, tok, tmp, state[0])
            torch.save({"iter": it, "optimizer": state[1], "config": cfg, "snapshots": snapshots},
                       os.path.join(tmp, "state.pt.part"))
        except Exception as e:              # a full disk, a file-size limit (safetensors raises its own error type)
            shutil.rmtree(tmp, ignore_errors=True)
            sys.exit(f"error: could not write the checkpoint of iteration {it} to {tmp} ({type(e).__name__}: "
                     f"{str(e)[:120]}); {path} still holds the previous one")
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

# -----------------------------------------------------------------------------
# resume

FIXED_ON_RESUME = ("env", "model_name", "n_rounds")    # what the checkpoint's policy and log are about

def resume_config(cfg, given, ckpt, rank, world, default_device="auto"):
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
        cfg["device"] = default_device
    if "dtype" not in given:
        print(f"resume: dtype {cfg['dtype']}, as the checkpoint's run (--dtype changes it)")
    return cfg, state

def resume_optimizer(model, opt, state, cfg, ckpt, rank=0):
    """--resume: Adam's state from the checkpoint (at the config's lr and weight decay; sharded as the model is)
    and the agent buffer's snapshots still on disk. -> the snapshot paths."""
    osd, names = state.pop("optimizer"), [n for n, _ in model.named_parameters()]   # (not kept: Adam's whole state)
    if isinstance(osd["param_groups"][0]["params"][0], int):            # written before --fsdp: keyed by position
        osd = devices.by_name(osd, names)
    for name, p in model.named_parameters():                            # as many tensors, other shapes: another model
        bad = [k for k, v in osd["state"].get(name, {}).items() if torch.is_tensor(v) and v.dim() and v.shape != p.shape]
        if bad:
            sys.exit(f"error: {ckpt}/state.pt: the optimizer state does not fit this model (Adam's {bad[0]} is "
                     f"{tuple(osd['state'][name][bad[0]].shape)} for {name} of {tuple(p.shape)}): restore the checkpoint's state.pt")
    try:
        if osd["state"]:                                                # (none: saved before any step; loading would invent one)
            set_optimizer_state_dict(model, opt, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    except (ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"error: {ckpt}/state.pt: the optimizer state does not fit this model ({type(e).__name__}: {str(e)[:100]})")
    for group in opt.param_groups:                                      # a resumed run takes the config's lr
        group["lr"], group["weight_decay"] = cfg["lr"], cfg["weight_decay"]
    listed = [os.path.join(cfg["out_dir"], "snapshots", os.path.basename(f)) for f in state["snapshots"]]
    snapshots = [f for f in listed if os.path.exists(f)]
    if len(snapshots) < len(listed) and rank == 0:
        print(f"resume: {len(listed) - len(snapshots)} of the agent buffer's {len(listed)} snapshots are missing "
            f"from {cfg['out_dir']}/snapshots: the buffer goes on without them")
    return snapshots

def load_state(ckpt):
    """ckpt/state.pt -> dict, or exit with one line saying the file is damaged."""
    f = os.path.join(ckpt, "state.pt")
    try:
        state = torch.load(f, weights_only=True, mmap=True, map_location="cpu")   # read as needed, not all at once
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

# -----------------------------------------------------------------------------
# the agent buffer's snapshots

def snapshot_path(out_dir, it):
    return os.path.join(out_dir, "snapshots", f"iter{it:05d}.safetensors")

def save_snapshot(model, out_dir, it):
    from safetensors.torch import save_file
    f = snapshot_path(out_dir, it)
    os.makedirs(os.path.dirname(f), exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight" or not model.cfg.tie_embeddings}
    try:
        save_file(sd, f + ".tmp")
        os.replace(f + ".tmp", f)
    except Exception as e:                  # as a checkpoint: a full disk, a file-size limit
        if os.path.isfile(f + ".tmp"):
            os.remove(f + ".tmp")
        sys.exit(f"error: could not write the agent-buffer snapshot {f} ({type(e).__name__}: {str(e)[:120]}); "
                 "the last checkpoint and the earlier snapshots are kept")
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
