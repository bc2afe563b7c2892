"""The checkpoint files of a run folder: their names and order, atomic writes,
the training state kept beside the weights, and retention.

`checkpoint_<N>` holds the weights after epoch N (counted from 1) in the
reference state-dict format, so old and new code load each other's.
`partial_<N>_<B>` holds them mid-epoch: epoch N in progress, B batches done.
Each has a `<name>.state` beside it (optimizer, position, RNG, best
accuracy, config, wandb run id), written first; the weights are renamed into
place last, so a checkpoint whose weights file exists is complete.

Every file here loads with `torch.load(weights_only=True)`: tensors, numbers,
strings and containers only, so a run folder from someone else cannot run
code on this machine. `.state` files written before 2026-12-05 hold a NumPy
array (the RNG state) that only a full unpickling reads; `read_state` opens
them only when asked to (`legacy_state_files`).
"""

import os
import pickle
import random
import re
import sys

import numpy as np
import torch

from utils import is_main_process

PATTERNS = (re.compile(r"checkpoint_(\d+)"), re.compile(r"partial_(\d+)_(\d+)"))


def position(name):
    """(epochs finished, batches done in the next) for a checkpoint name, or
    None for any other file."""
    for pattern in PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            numbers = [int(g) for g in match.groups()]
            return (numbers[0], 0) if len(numbers) == 1 else (numbers[0] - 1, numbers[1])
    return None


def complete_checkpoints(folder):
    """Checkpoint names in training order, oldest first."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if position(n) is not None and os.path.isfile(os.path.join(folder, n))]
    return sorted(names, key=position)


def name_for(epoch, batches_done=0):
    """Name of a checkpoint taken in 0-based `epoch` after `batches_done`
    batches; 0 means the epoch's end."""
    return f"checkpoint_{epoch + 1}" if batches_done == 0 else f"partial_{epoch + 1}_{batches_done}"


def atomic_save(obj, path):
    """torch.save to a temporary name, then rename: a reader (or a restart
    after SIGKILL) sees the old file or the whole new one, never half."""
    temporary = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def write(folder, name, weights, state):
    os.makedirs(folder, exist_ok=True)
    atomic_save(state, os.path.join(folder, name + ".state"))
    atomic_save(weights, os.path.join(folder, name))  # last: marks the checkpoint complete


class UnsafeStateFile(Exception):
    """A .state file that safe loading refuses: it needs a full unpickling,
    which can run code."""


def read_state(weights_path, allow_pickle=False):
    """The training state beside a weights file; None for a weights-only
    (e.g. reference) checkpoint. Loaded safely; a file that needs a full
    unpickling (an older state file, or a crafted one) raises UnsafeStateFile
    unless `allow_pickle`, which loads it with a warning."""
    path = weights_path + ".state"
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).replace(" ", "_").lower():
            raise  # not a refused object: a damaged file
        if not allow_pickle:
            raise UnsafeStateFile(path) from None
    if is_main_process():
        print(f"warning: {path}: an older training state, read by full unpickling (legacy_state_files is on)", file=sys.stderr, flush=True)
    return torch.load(path, map_location="cpu", weights_only=False)


def prune(folder, keep_last, keep=()):
    """Keep the newest `keep_last` end-of-epoch checkpoints, those named in
    `keep` (e.g. the best), and up to `keep_last` mid-epoch ones newer than
    them; delete the rest and leftovers of interrupted writes."""
    for name in os.listdir(folder):
        if name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))
    if keep_last <= 0:
        return
    names = complete_checkpoints(folder)
    ends = [n for n in names if n.startswith("checkpoint_")]
    # mid-epoch checkpoints matter only until their epoch's end is saved
    newer = [n for n in names if not ends or position(n) > position(ends[-1])]
    keep = set(keep) | set(ends[-keep_last:]) | set(newer[-keep_last:])
    for name in names:
        if name not in keep:
            for path in (os.path.join(folder, name), os.path.join(folder, name + ".state")):
                if os.path.exists(path):
                    os.remove(path)


def rng_state():
    """Every generator's state, in types safe loading accepts (NumPy's key
    array as a tensor)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an older file holds the array itself
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_state(module, optimizer):
    """AdamW state keyed by parameter name, the same whether it came from one
    process or from shards (so a run may resume on another world size)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = [name for name, _ in module.named_parameters()]
    plain = optimizer.state_dict()
    return {
        "state": {names[i]: value for i, value in plain["state"].items()},
        "param_groups": [dict(group, params=[names[i] for i in group["params"]]) for group in plain["param_groups"]],
    }


def load_optimizer_state(module, optimizer, saved):
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))
        return
    index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    optimizer.load_state_dict({
        "state": {index[name]: value for name, value in saved["state"].items()},
        "param_groups": [dict(group, params=[index[n] for n in group["params"]]) for group in saved["param_groups"]],
    })
