"""Training: a stage's batches for this rank, one epoch of forward,
backward and optimizer steps with the losses read at sync points (a
diverged run stops before it saves), and the validation loss."""

import time

import torch
from tqdm import tqdm

from build import precision
from checkpoints import SavePolicy, TrainingState
from distributed import all_reduce_max_tensor, all_reduce_sum, as_coconut, barrier, is_sharded
from utils import is_main_process, print0


def train_size(configs):
    """How many samples of train_path to train on, from its start."""
    size = configs.train_samples or 100000000
    return min(size, 5000) if configs.debug else size


def epoch_batches(dataset, configs, collator, process, batches_done=0):
    """This rank's batches of a dataset (`process`: a distributed.Process),
    in the same order on every run, after the first `batches_done` (a
    mid-epoch resume)."""
    from torch.utils.data import DataLoader, DistributedSampler

    indices = list(DistributedSampler(dataset, num_replicas=process.world, rank=process.rank, shuffle=False))
    # on a GPU one worker lays out and pads the next batches during the step;
    # on a CPU it would only take a core from the model
    workers = 1 if process.device.type == "cuda" else 0
    # its own generator: a loader draws a seed when iterated, and drawing it
    # from the global RNG would shift dropout after a mid-epoch resume
    return DataLoader(dataset, batch_size=configs.batch_size_training, sampler=indices[batches_done * configs.batch_size_training :],
                      collate_fn=collator, num_workers=workers, pin_memory=workers > 0, generator=torch.Generator())


def model_inputs(batch, device, coconut=None, min_passes=0):
    """A batch on the device (asynchronously from the loader's pinned memory)
    as the model's keywords; for a Coconut, with its latent plan computed on
    the CPU batch, which spares a device sync, and `min_passes` (see
    passes_in_step)."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "idx"}
    if coconut is not None:
        inputs["plan"] = coconut.plan(batch["input_ids"])
        if min_passes:
            inputs["min_passes"] = min_passes
    return inputs


def passes_in_step(parallel, dataset):
    """Under FSDP every rank must call the base model equally often in a
    forward (each call gathers the sharded weights), but a batch makes one
    call per latent column of its widest row, which differs between ranks
    when rows hold different latent counts (uniform_prob, or
    pad_latent_to_max off). Every forward then makes as many calls as the
    stage's widest sequence needs, a number each rank computes alike; 0
    (no padding) when nothing is sharded or the dataset does not know its
    widest sequence."""
    coconut = as_coconut(parallel)
    if coconut is None or not is_sharded(parallel) or not hasattr(dataset, "max_latents"):
        return 0
    return dataset.max_latents()


class NonFiniteLoss(Exception):
    """Training diverged; the run stops without saving that state."""


class PendingLosses:
    """Training losses kept on the device between sync points, so that a
    batch costs no host sync and no collective. `flush` reads them all at
    once, stops every rank together if any rank had a non-finite loss (one
    all-reduce), and logs each batch under its own step, as if logged when
    it ran."""

    def __init__(self, configs, epoch, total, stage, logger, pbar):
        self.configs, self.epoch, self.total, self.stage = configs, epoch, total, stage
        self.logger, self.pbar = logger, pbar
        self.batch_indices, self.losses, self.times = [], [], []

    def add(self, batch_index, loss):
        self.batch_indices.append(batch_index)
        self.losses.append(loss.detach().float())
        self.times.append(time.monotonic())

    def __len__(self):
        return len(self.batch_indices)

    def flush(self):
        if not self.batch_indices:
            return
        losses = torch.stack(self.losses)
        bad = all_reduce_max_tensor((~torch.isfinite(losses)).int())
        values, bad = losses.tolist(), bad.tolist()  # the host sync
        indices, times = self.batch_indices, self.times
        self.batch_indices, self.losses, self.times = [], [], []
        epoch, total = self.epoch, self.total
        for batch_index, value, not_finite, when in zip(indices, values, bad, times):
            if not_finite:  # on some rank: every rank stops at this flush
                raise NonFiniteLoss(f"non-finite training loss at epoch {epoch + 1}, batch {batch_index}: stopping without saving")
            full_loss = value * self.configs.gradient_accumulation_steps
            # train/step counts batches since the run began (the reference's step)
            step = epoch * total + batch_index
            row = {"train/epoch": epoch + 1, "train/step": step, "train/loss": full_loss}
            self.logger.log(row, self.stage, epoch + 1, step, when=when, batch=batch_index)
        self.pbar.set_description(f"Training Epoch: {epoch + 1}/{self.configs.num_epochs}, batch {indices[-1]}/{total} (loss: {full_loss:.4f})")


def train_epoch(parallel, optimizer, batches, configs, *, stage, device, logger, tokenizer=None, state=None, save=None):
    """One pass over `batches` at curriculum `stage`, in the epoch of the
    TrainingState `state` (default: the first, from its start), after its
    `batches_done` batches; `state` counts the optimizer steps.
    `save(batches_done)` is called where SavePolicy.mid_epoch says. Losses
    are read (logged, checked) every `sync_every` batches and before every
    save, so a diverged state is never saved; `tokenizer` decodes the
    first batch's wandb table. Returns the number of batches in the whole
    epoch."""
    state = state if state is not None else TrainingState()
    epoch, batches_done = state.epoch, state.batches_done
    parallel.train()
    accumulate = configs.gradient_accumulation_steps
    total = batches_done + len(batches)
    pbar = tqdm(total=total // accumulate, initial=batches_done // accumulate, desc=f"Training Epoch: {epoch + 1}",
                unit="step", disable=not is_main_process(), dynamic_ncols=True)
    pending = PendingLosses(configs, epoch, total, stage, logger, pbar)
    coconut = as_coconut(parallel)
    min_passes = passes_in_step(parallel, getattr(batches, "dataset", None))
    started = time.perf_counter()
    try:
        for batch_index, batch in enumerate(batches, start=batches_done):
            if batch_index == 0:
                logger.batch_table(batch, tokenizer, epoch * total)
            with precision(configs, device):
                loss = parallel(**model_inputs(batch, device, coconut, min_passes)).loss / accumulate
            pending.add(batch_index, loss)
            loss.backward()
            saving = False
            last_batch = batch_index == total - 1
            if (batch_index + 1) % accumulate == 0 or last_batch:
                optimizer.step()
                optimizer.zero_grad()
                pbar.update(1)
                state.optimizer_steps += 1
                steps_in_epoch = (batch_index + 1) // accumulate
                saving = save is not None and SavePolicy.mid_epoch(configs, steps_in_epoch, last_batch)
            if saving or len(pending) >= configs.sync_every or last_batch:
                pending.flush()
            if saving:
                save(batch_index + 1)
    finally:
        pbar.close()  # ends the bar's line, also before an error message
    report_speed(epoch, len(batches), accumulate, time.perf_counter() - started)  # the last flush waited for the device
    barrier()
    return total


def report_speed(epoch, n_batches, accumulate, seconds):
    if n_batches:
        n_steps = -(-n_batches // accumulate)
        print0(f"Epoch {epoch + 1}: {n_steps} optimizer steps in {seconds:.1f} s ({n_steps / max(seconds, 1e-9):.1f} steps/s)")


@torch.no_grad()
def validation_loss(parallel, loader, configs, process):
    """Mean over batches of the loss averaged over ranks, read once at the end."""
    parallel.eval()
    coconut = as_coconut(parallel)
    min_passes = passes_in_step(parallel, loader.dataset)
    losses = []
    for batch in tqdm(loader, desc="Validation loss", unit="batch", disable=not is_main_process(), dynamic_ncols=True):
        with precision(configs, process.device):
            losses.append(parallel(**model_inputs(batch, process.device, coconut, min_passes)).loss.detach().float())
    total = 0.0
    if losses:  # summed in the order and precision of a per-batch reading
        for loss in all_reduce_sum(torch.stack(losses)).tolist():
            total += loss / process.world
    return total / max(len(loader), 1)

