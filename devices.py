"""
devices.py: where a run runs. The device and dtype, the CPU threads, how many tokens one forward/backward may
take, and under torchrun the process group and the two collectives train.py uses (each process plays its
share of the games; the credits see every game; the gradients are summed).

    torchrun --standalone --nproc_per_node 2 train.py --env ipd     # CPUs: gloo; GPUs: NCCL, one per process
"""
import os
import sys

import torch
import torch.distributed as dist

def check_device(dev):
    """Raise ValueError with one line if dev is not a usable device of this torch build."""
    try:
        d = torch.device(dev)
    except RuntimeError:
        raise ValueError(f"--device {dev!r} is not a device: use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {dev} but this torch has no usable CUDA (build {torch.__version__}): "
                         "use --device cpu, or install a CUDA build of torch")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {dev} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {dev}: only cpu and cuda are supported")

def pick_device_dtype(dev, dt):
    """CUDA when present. dtype auto: bf16 autocast on CUDA, fp32 on a CPU. Not a speed test: the dtype
    changes what is learned (results/timings.md), so a CPU run gives the same numbers on any CPU unless
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

def use_cpu_threads():
    """Every core unless OMP_NUM_THREADS says otherwise (torch's own default may be fewer). The thread count can
    change a CPU's sums, so the sampled text: runs that should replay each other set the same count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))

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

# -----------------------------------------------------------------------------
# several processes (torchrun)

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

def all_sum_grads(model, world):
    """Sum every parameter's gradient over the processes (a parameter no micro-batch reached counts as 0)."""
    if world > 1:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
