"""GPU diagnostic (one H200 on 2026-11-28): the IPD update at 128 games with the shared prefix and without it, then
one update of each profiled. `python results/scripts/gpu_update_diag.py`; on a CPU: `DEV=cpu G=2 python results/scripts/gpu_update_diag.py`."""
import os, statistics, sys, time
import torch
sys.path.insert(0, ".")
import devices
import train
from load import load_model
from rollout import LMPolicy, rollout
dev = torch.device(os.environ.get("DEV", "cuda")); G = int(os.environ.get("G", "128"))
sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
model, tok = load_model("smollm2-135m", dev, torch.float32)
pol = LMPolicy(model, tok)
ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
cfg = train.resolve({k: getattr(train, k) for k in train.CONFIG_KEYS} | {"env": "ipd", "n_games": G})
trained = torch.zeros(2 * G, dtype=torch.bool)
trained[2 * torch.arange(G) + (torch.arange(G) // cfg["group_size"]) % 2] = True
with ac:
    ro = rollout("ipd", [pol], torch.zeros(G, 2, dtype=torch.long), G, seed=0, group_size=cfg["group_size"],
                 n_rounds=cfg["n_rounds"])
credit, _ = train.compute_credits(ro.rewards, trained, cfg)
opt = torch.optim.Adam(model.parameters(), lr=0.0)
model.train()
c = cfg | {"skip_no_signal": False}
mt, L = devices.micro_batch_tokens(cfg, model), int(ro.length.max())
mb = train.micro_batches(trained.nonzero().flatten().tolist(), ro.length, mt)
P = train.shared_prefix(ro.ids[mb[0], :L], (ro.decision & trained[:, None])[mb[0], :L])
print("micro_tokens", mt, "n_mb", len(mb), "L", L, "P", P, flush=True)
def timed(label, n=4):
    ts = []
    for _ in range(n):
        sync(); t0 = time.perf_counter()
        train.update(model, None, opt, ro, credit, trained, c, ac)
        sync(); ts.append(time.perf_counter() - t0)
    print(label, [round(t, 3) for t in ts], "median of the last 3:", round(statistics.median(ts[1:]), 3), flush=True)
timed("update, shared prefix")
orig = train.shared_prefix
train.shared_prefix = lambda ids, mask: 0
timed("update, no shared prefix")
train.shared_prefix = orig
from torch.profiler import profile, ProfilerActivity
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
for label, fn in (("shared prefix", orig), ("no shared prefix", lambda ids, mask: 0)):
    train.shared_prefix = fn
    with profile(activities=acts) as prof:
        train.update(model, None, opt, ro, credit, trained, c, ac)
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(f"--- profile, {label}, by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60),
          flush=True)
