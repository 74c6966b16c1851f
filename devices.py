"""
devices.py: where a run runs. The device and dtype, the CPU threads, how many tokens one forward/backward may
take, and under torchrun the process group and the two collectives train.py uses (each process plays its
share of the games; the credits see every game; the gradients are summed), and with --fsdp, FSDP2: the policy's
weights, gradients and Adam state sharded over the processes, a full copy gathered for the rollout to decode.

    torchrun --standalone --nproc_per_node 2 train.py --env ipd     # CPUs: gloo; GPUs: NCCL, one per process
    torchrun --standalone --nproc_per_node 8 train.py --preset paper --model_name Qwen/Qwen2.5-7B-Instruct --fsdp true
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from model import Transformer, rope_inv_freq

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

def pick_device_dtype(dev, dt, exists=True):
    """CUDA when present. dtype auto: bf16 autocast on CUDA, fp32 on a CPU. Not a speed test: the dtype
    changes what is learned (results/timings.md), so a CPU run gives the same numbers on any CPU unless
    --dtype bfloat16 is asked for (faster on CPUs with bf16 instructions; its own results). exists=False: a device
    this machine may not have (a dry run's arithmetic for a GPU, on a CPU)."""
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(dev) if exists else torch.device(dev)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if dt == "auto":
        dt = "bfloat16" if dev.startswith("cuda") and (not exists or torch.cuda.is_bf16_supported()) else "float32"
    if dt not in ("float32", "bfloat16"):
        sys.exit(f"error: --dtype must be auto, float32 or bfloat16, got {dt!r}")
    return dev, dt

def use_cpu_threads():
    """Every core unless OMP_NUM_THREADS says otherwise (torch's own default may be fewer). The thread count can
    change a CPU's sums, so the sampled text: runs that should replay each other set the same count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))

def micro_batch_tokens(cfg, c, dev):
    """Tokens per forward/backward for a model of Config c on dev: --micro_tokens, or 0 = per device: 2560 on a
    CPU (~4 GB of activations for SmolLM2 in fp32), on CUDA what half the free memory holds (~4 bytes x
    (8 x n_embd + 5 x n_hidden) per token and layer, an estimate), between 512 and 65536."""
    if cfg["micro_tokens"] > 0:
        return cfg["micro_tokens"]
    dev = torch.device(dev)
    if dev.type != "cuda":
        return 2560
    return int(min(max(0.5 * torch.cuda.mem_get_info(dev)[0] / activation_bytes(c), 512), 65536))

def activation_bytes(c):
    """The update's activations per token of a model of Config c, an estimate: 4 x (8 x n_embd + 5 x n_hidden) a layer."""
    return 4 * c.n_layer * (8 * c.n_embd + 5 * c.n_hidden)

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

# -----------------------------------------------------------------------------
# several processes (torchrun)

BACKEND = "cuda:nccl,cpu:gloo"     # CUDA tensors over NCCL; CPU ones (--fsdp_offload's gradient norm) over gloo

def setup_distributed():
    """Under torchrun: join the process group (NCCL with one GPU per rank when CUDA is present, else gloo).
    -> (rank, world size, this rank's device or None)."""
    if "RANK" not in os.environ:
        return 0, 1, None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group(BACKEND)
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
    """Sum every parameter's gradient over the processes (a parameter no micro-batch reached counts as 0). FSDP's
    backward already reduced (and sharded) them."""
    if world > 1 and not sharded(model):
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): each process holds 1/world of every weight, gradient and Adam moment

def shard(model, dev, world, offload=False, bf16=False):
    """fully_shard each block, then the model (embedding, final norm, head); the shards go to dev, or stay in host
    memory with offload (CPUOffloadPolicy: Adam steps there, each block comes to the GPU when it computes). The
    loss is already divided by every process's token count, so the gradients are summed, not averaged. bf16: the
    blocks are gathered and computed in bf16 (FSDP2's mixed precision: autocast's own copies of gathered weights
    would live until backward, 2 bytes a parameter of the whole model), their gradients reduced in fp32; the rest
    stays fp32 under autocast, as in a plain run (as_computed)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)
        FSDPModule.set_force_sum_reduction_for_comms
    except (ImportError, AttributeError):
        sys.exit(f"error: --fsdp needs a torch with FSDP2's fully_shard and its sum reduction (2.13 has them; this is {torch.__version__})")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")   # our blocks return k, v views: never written
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev).index or 0)             # ("cuda": the first; torchrun gives cuda:N)
    if not dist.is_initialized():                                       # --fsdp in one process: a group of one
        dist.init_process_group(BACKEND if dev.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    how = dict(mesh=init_device_mesh(torch.device(dev).type, (world,)),
               offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    mixed = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, **how, mp_policy=mixed)
    fully_shard(model, **how, reshard_after_forward=True)               # (the root's default keeps its weights whole)
    register_fsdp_forward_method(model, "token_logprobs")               # train.py calls it, not forward
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)                  # gloo has no pre-scaled sum
    model.fsdp = True
    return model

def sharded(model):
    return getattr(model, "fsdp", False)

@torch.no_grad()
def gather_into(copy, model):
    """Fill a plain model (the rollout's copy: the engine decodes it unchanged) with a sharded model's weights: the
    parameters outside the blocks, then each block's, gathered in turn and cast to the copy's dtype."""
    mine = dict(copy.named_parameters())
    for m, prefix in [(model, "")] + [(b, f"model.layers.{i}") for i, b in enumerate(model.model.layers)]:
        m.unshard()                                                     # this one's weights, whole, on the device
        for name, p in m.named_parameters(prefix=prefix):
            if m is not model or not name.startswith("model.layers."):  # the root's own: not the blocks'
                mine[name].copy_(p)
        m.reshard()

def as_computed(model, bf16):
    """A plain model's weights as a sharded bf16 run computes them (shard): the blocks in bf16, the embedding, final
    norm and head in fp32 (autocast rounds the head's matmul); fp32 alone when not bf16. For the rollout's copy and the
    frozen copies: what they sample is what the update scores, on-policy."""
    if bf16:
        for block in model.model.layers:
            block.to(torch.bfloat16)
    return model

def rollout_copy(model, dev, bf16):
    """A plain model on dev, its weights as computed (as_computed), filled from the sharded one: what the rollout
    decodes."""
    with torch.device("meta"):
        copy = as_computed(Transformer(model.cfg), bf16)
    copy = copy.to_empty(device=dev)                                    # allocated once, in its dtypes
    if copy.cfg.tie_embeddings:                                         # (to_empty unties them)
        copy.lm_head.weight = copy.model.embed_tokens.weight
    copy.inv_freq, copy.hf_config = rope_inv_freq(model.cfg).to(dev), model.hf_config
    gather_into(copy, model)
    return copy.eval()

def passes_behind(n, model, world, dev):
    """With FSDP, every process must make as many forward/backward passes (each gathers and reduces with all):
    how many empty ones this process adds to its n micro-batches."""
    if world == 1 or not sharded(model):
        return 0
    most = torch.tensor([n], device=dev)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most) - n

def full(x):
    """A DTensor's whole value (clip_grad_norm_ of sharded gradients returns one), or x itself."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x

def local_bytes(tensors):
    """Bytes this process holds of these tensors (of a DTensor: its shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)

def full_state(model, opt):
    """The model's and Adam's whole state dicts, keyed by parameter name, on process 0 (every process must call it;
    sharded, the others get empty ones): one format with or without FSDP, so a checkpoint resumes on any number of
    processes. Sharded, they are gathered into process 0's host memory; plain, they are the live tensors."""
    how = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=how) if sharded(model) else model.state_dict()
    if sharded(model) and opt.state:                                    # (no step yet: gathering would invent one)
        return sd, get_optimizer_state_dict(model, opt, options=how)
    return sd, by_name(opt.state_dict(), [n for n, _ in model.named_parameters()])

def by_name(osd, names):
    """An optimizer state dict keyed by position (torch's, for the parameters in model.parameters() order) -> keyed by
    parameter name, the form torch.distributed.checkpoint reads into a plain or sharded model."""
    return {"state": {names[i]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
