"""Processes and collectives: the process group (NCCL on GPUs, gloo on
CPUs), the few collectives training and evaluation use, DDP and FSDP
wrapping, and the full state dict of a sharded model."""

import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist

from build import plain_model
from coconut import Coconut
from utils import print0


class Process(NamedTuple):
    """This process's place in the launch: its rank, the number of processes,
    and the device it computes on."""

    rank: int
    world: int
    device: torch.device


def single_process_device():
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed():
    """This Process. Under torchrun: NCCL on GPU, gloo on CPU, device set
    before the process group. A plain process gets no group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Process(0, 1, single_process_device())
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Process(rank, world, device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value):
    """An int's maximum over all ranks (a collective: call it on every rank)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    return int(all_reduce_max_tensor(tensor).item())


def all_reduce_max_tensor(tensor):
    """Elementwise maximum over all ranks, on the tensor's device."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextmanager
def main_process_first():
    """The body runs on the node's first process, then on the others: the
    first fills datasets' cache, the others read what it wrote. The first
    process reaches the barrier even when the body fails, so the others go
    on to meet the same error instead of waiting forever."""
    if not dist.is_initialized():
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()



# --------------------------------------------------------------- wrapping
def wrap_model(model, configs, world, device):
    """Step 8: one process keeps the model as is; several use DDP for
    evaluation-only runs and FSDP (each decoder block its own shard unit)
    for training. Returns the module to call for training and loss."""
    model.to(device)
    if world == 1:
        return model
    if configs.only_eval:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    units = shard_units(model)
    kinds = sorted({type(m).__name__ for m in units})  # before fully_shard renames the classes FSDP<name>
    for module in units:
        fully_shard(module)
    fully_shard(model)  # the root: embeddings, final norm, head, and any latent_projection
    print0(f"FSDP: {len(units)} shard units ({', '.join(kinds) or 'none: no _no_split_modules match'}) and the root")
    return model


def shard_units(model):
    """The decoder blocks, each its own FSDP unit: modules whose class the
    model lists in `_no_split_modules` (GPT2Block, LlamaDecoderLayer,
    Qwen2DecoderLayer, ...)."""
    block_names = set(getattr(plain_model(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in block_names]


def unwrap(parallel):
    """The module inside a DDP wrapper (FSDP2 shards in place, no wrapper)."""
    return parallel.module if hasattr(parallel, "module") else parallel


def as_coconut(parallel):
    module = unwrap(parallel)
    return module if isinstance(module, Coconut) else None


def is_sharded(module):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(parallel):
    """The reference state-dict format (wrapper keys for Coconut); gathered
    on every rank when sharded, so call it on all ranks."""
    if is_sharded(parallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(parallel, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(parallel).state_dict()


@contextmanager
def parallel_unsharded(module):
    """Keeps the root shard unit gathered while generating: generation calls
    the embedding directly, outside the root module's forward hooks."""
    module.unshard()
    try:
        yield
    finally:
        module.reshard()

