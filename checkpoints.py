"""All checkpoint I/O: the checkpoint files of a run folder (names and
order, atomic writes, retention), the training state kept beside the
weights, and for a run, where it resumes, what it saves, and what a resume
restores.

`checkpoint_<N>` holds the weights after epoch N (counted from 1) in the
reference state-dict format, so old and new code load each other's.
`partial_<N>_<B>` holds them mid-epoch: epoch N in progress, B batches done.
Each has a `<name>.state` beside it (the TrainingState below: position,
optimizer steps, best accuracy, wandb run id; and the optimizer, RNG and
config), written first; the weights are renamed into
place last, so a checkpoint whose weights file exists is complete.

Every file here loads with `torch.load(weights_only=True)`: tensors, numbers,
strings and containers only, so a run folder from someone else cannot run
code on this machine. `.state` files written before 2026-12-05 hold a NumPy
array (the RNG state) that only a full unpickling reads; `read_state` opens
them only when asked to (`legacy_state_files`).
"""

import dataclasses
import gc
import os
import pickle
import random
import re
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import build
from distributed import barrier, full_state_dict
from utils import Config, UserError, asked_config, atomic_write, is_main_process, print0, run_folder

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


def newest_checkpoint(folder):
    """The path of the folder's newest complete checkpoint; None if it holds none."""
    names = complete_checkpoints(folder)
    return os.path.join(folder, names[-1]) if names else None


def name_for(epoch, batches_done=0):
    """Name of a checkpoint taken in 0-based `epoch` after `batches_done`
    batches; 0 means the epoch's end."""
    return f"checkpoint_{epoch + 1}" if batches_done == 0 else f"partial_{epoch + 1}_{batches_done}"


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


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


# ------------------------------------------------------- a run's checkpoints
@dataclasses.dataclass
class TrainingState:
    """Where a run stands: saved in every checkpoint's .state (as plain
    numbers and strings, beside the optimizer and RNG states) and restored
    by a resume from a checkpoint of the same run."""

    epoch: int = 0  # the next epoch to train, from 0 (after epoch e ends: e + 1)
    batches_done: int = 0  # batches of that epoch already trained (a mid-epoch checkpoint)
    optimizer_steps: int = 0  # optimizer steps since the run began (0 in .state files before 2026-12-05)
    best_acc: float = 0.0  # best validation accuracy so far
    best_name: str | None = None  # the checkpoint holding it
    wandb_id: str | None = None  # the wandb run this run logs to

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, saved):
        """The fields a saved state holds (older files lack some; they keep
        their current values)."""
        for field in dataclasses.fields(self):
            if field.name in saved:
                setattr(self, field.name, saved[field.name])

    def checkpoint_name(self):
        """The name of a checkpoint taken now: checkpoint_<epochs done> at an
        epoch's end, partial_<epoch>_<batches> within one."""
        return name_for(self.epoch - 1) if self.batches_done == 0 else name_for(self.epoch, self.batches_done)


class SavePolicy:
    """When a run saves, decided here only: never in a debug run; at every
    epoch end, or with save_only_improve only after an evaluation that beats
    the best accuracy; and within an epoch every save_every_steps optimizer
    steps of it (not at its last batch, where the epoch-end rule applies)."""

    def __init__(self, configs):
        self.configs = configs
        self.enabled = not configs.debug

    @staticmethod
    def mid_epoch(configs, steps_in_epoch, last_batch):
        every = configs.save_every_steps
        return bool(every) and steps_in_epoch % every == 0 and not last_batch

    def after_training(self):
        return self.enabled and not self.configs.save_only_improve

    def after_evaluation(self, improved):
        return self.enabled and self.configs.save_only_improve and improved


class ResumePoint(NamedTuple):
    """Where a preempted run continues: after `batches_done` batches of
    0-based `epoch`, from the weights file `checkpoint`."""

    epoch: int
    batches_done: int
    checkpoint: str


def find_resume_checkpoint(configs):
    """Step 1: a folder with checkpoints means a preempted run, to resume from
    the newest complete one (the given `resume` is then ignored). Returns
    its ResumePoint, or None (no checkpoint, or only_eval)."""
    if configs.only_eval:
        return None
    checkpoint = newest_checkpoint(run_folder(configs))
    if checkpoint is None:
        return None
    name = os.path.basename(checkpoint)
    epoch, batches_done = position(name)
    where = f"epoch {epoch}" + (f", batch {batches_done}" if batches_done else "")
    print0(f"Found a previous run in {run_folder(configs)}: resuming from {name} ({where}; the configured `resume` is ignored)")
    if epoch >= configs.num_epochs:
        print0(f"All {configs.num_epochs} epochs are done already; raise num_epochs to train further")
    return ResumePoint(epoch, batches_done, checkpoint)


def gather_rng_states():
    """Every rank's RNG state, in rank order (a collective when distributed)."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(parallel, optimizer, configs, state):
    """Weights in the reference format, and beside them what continuing
    needs: the TrainingState `state`, the optimizer and every rank's RNG.
    Collective: call it on every rank."""
    weights = full_state_dict(parallel)
    optim = optimizer_state(parallel, optimizer) if optimizer is not None else None
    rng = gather_rng_states()
    name = state.checkpoint_name()
    if is_main_process():
        saved = dict(state.state_dict(), optimizer=optim, rng=rng, config=configs.to_dict())
        write(run_folder(configs), name, weights, saved)
        prune(run_folder(configs), configs.keep_last, keep={state.best_name})
        print(f"saving model to {os.path.join(run_folder(configs), name)}", flush=True)
    barrier()
    del weights, optim
    gc.collect()
    return name


def in_run_folder(path, configs):
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(run_folder(configs))


def restore(configs, parallel, optimizer, rank, state):
    """What was saved beside the weights being resumed: the TrainingState
    (best accuracy and its checkpoint, wandb run, optimizer steps; loaded
    into `state`), this rank's RNG, and the optimizer (unless a fresh one is
    due anyway); returns the optimizer. A weights-only (reference)
    checkpoint restores nothing, and so does one from another run's folder:
    a warm start (a CoT checkpoint starting a Coconut run) takes its weights
    only, as the reference does, and is a run of its own. The position
    (epoch, batches done) comes from the checkpoint's name, found before."""
    if configs.load_model_path is None or configs.only_eval or not in_run_folder(configs.load_model_path, configs):
        return optimizer
    try:
        saved = read_state(configs.load_model_path, allow_pickle=configs.legacy_state_files)
    except UnsafeStateFile:
        raise UserError(
            f"{configs.load_model_path}.state: holds objects that safe loading refuses (a file from before 2026-12-05, "
            "or not from coconut); set legacy_state_files: True to read it, only if you trust its source"
        ) from None
    except Exception as e:  # a corrupt side file must not be half-used
        raise UserError(f"{configs.load_model_path}.state: not a readable training state ({type(e).__name__})") from None
    if saved is None:
        return optimizer
    state.load_state_dict(saved)  # its position is the one the checkpoint's name gave
    rngs = saved["rng"]
    restore_rng(rngs[rank] if rank < len(rngs) else rngs[0])
    if saved["optimizer"] is not None and (saved["batches_done"] or not configs.reset_optimizer):
        optimizer = optimizer or build.build_optimizer(parallel, configs)
        load_optimizer_state(parallel, optimizer, saved["optimizer"])
    return optimizer


def save_run_config(asked, configs):
    """Beside the checkpoints: `config.yaml`, what the user asked for (the
    config file's keys, then the command-line overrides: the same command
    again when given to run.py), and `resolved.yaml`, every key as this run
    uses it (the RunConfig `configs`), its head naming the method and each
    key set-up changed."""
    if not is_main_process() or configs.debug or configs.only_eval:
        return
    import yaml

    folder = run_folder(configs)
    os.makedirs(folder, exist_ok=True)
    resolved = configs.to_dict()
    as_asked = asked_config(Config(asked), source=os.path.join(folder, "config.yaml")).to_dict()
    changed = [f"#   {key}: {as_asked[key]} -> {value}" for key, value in resolved.items() if as_asked[key] != value]
    asked_head = [
        "# What the user asked for: the config file's keys, then the command-line overrides.",
        "# resolved.yaml beside it holds every key as the run used it.",
    ]
    resolved_head = [
        f"# Every key as the run used it (method: {configs.method}): config.yaml with the",
        "# defaults filled in" + (", and changed by set-up (asked -> used):" if changed else "; set-up changed nothing."),
        *changed,
    ]
    for name, head, values in (("config.yaml", asked_head, dict(asked)), ("resolved.yaml", resolved_head, resolved)):
        text = "\n".join(head) + "\n" + yaml.safe_dump(values, sort_keys=False)
        atomic_write(os.path.join(folder, name), lambda f, text=text: f.write(text))
