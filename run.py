"""The training CLI: `python run.py CONFIG.yaml [key=value ...]`, or under
`torchrun --nnodes N --nproc_per_node M run.py CONFIG.yaml`.

Reads the config, builds model and tokenizer in the reference set-up order
(SPEC section 7), then for each epoch trains one stage of the curriculum,
saves a checkpoint, measures validation loss, and evaluates answer accuracy
by greedy generation. Owns the process group, wrapping, checkpoints and
logging.
"""

import argparse
import copy
import gc
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import metrics
from coconut import Coconut, fast_path_unsupported
from dataset import MyCollator, get_cot_latent_dataset, get_dataset, get_question_latent_dataset, load_samples
from utils import UserError, is_main_process, load_config, print0, set_seed

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


# --------------------------------------------------------------- processes
def init_distributed():
    """(rank, world size, device). Under torchrun: NCCL on GPU, gloo on CPU,
    device set before the process group. A plain process gets no group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return 0, 1, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


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


# ------------------------------------------------------------------- model
def run_folder(configs):
    return os.path.join(configs.save_path, configs.name)


def find_resume_checkpoint(configs):
    """Step 1: a folder with checkpoints means a preempted run: resume from the
    newest complete one (ignoring the given `resume`). Returns the number of
    batches of epoch `resume` already done (mid-epoch checkpoints)."""
    if configs.only_eval:
        return 0
    names = checkpoints.complete_checkpoints(run_folder(configs))
    if not names:
        return 0
    configs.resume, batches_done = checkpoints.position(names[-1])
    configs.load_model_path = os.path.join(run_folder(configs), names[-1])
    where = f"epoch {configs.resume}" + (f", batch {batches_done}" if batches_done else "")
    print0(f"Found a previous run in {run_folder(configs)}: resuming from {names[-1]} ({where}; the configured `resume` is ignored)")
    if configs.resume >= configs.num_epochs:
        print0(f"All {configs.num_epochs} epochs are done already; raise num_epochs to train further")
    return batches_done


def load_pretrained(model_id):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        # float32 as in the reference (transformers 5 would otherwise load the
        # checkpoint's dtype, bfloat16 for Llama 3.2 and Qwen2.5); `bf16` and
        # `mixed_precision` choose lower precision explicitly
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model_id '{model_id}': cannot load model or tokenizer ({first})") from None
    return model, tokenizer


def read_state_dict(path):
    if not os.path.isfile(path):
        raise UserError(f"load_model_path '{path}': no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise UserError(f"load_model_path '{path}': not a readable checkpoint ({type(e).__name__})") from None


def load_weights(module, state_dict, path):
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise UserError(f"load_model_path '{path}': weights do not fit the model ({str(e).splitlines()[0]})") from None
    print0(f"Loaded {path}: {result}")


def init_latent_embeddings(model, tokenizer):
    """Step 4: room for the new tokens, initialised from `<<` (it steadies the
    start of training)."""
    # the new rows are overwritten below, so skip the costly mean initialisation
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    target = tokenizer.convert_tokens_to_ids("<<")
    if target is None or target == tokenizer.unk_token_id:
        target = tokenizer.encode("<<", add_special_tokens=False)[0]
    tables = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    with torch.no_grad():
        for token in LATENT_TOKENS:
            token_id = tokenizer.convert_tokens_to_ids(token)
            for table in tables:
                table[token_id] = table[target]


def build_model(configs):
    """Steps 2 to 7 of the set-up order. Returns (model, tokenizer, token ids)."""
    saved = read_state_dict(configs.load_model_path) if configs.load_model_path != "None" else None
    model, tokenizer = load_pretrained(configs.model_id)
    tokenizer.pad_token = tokenizer.eos_token
    for token in LATENT_TOKENS:
        tokenizer.add_tokens(token)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS}

    deferred = False
    if saved is not None:
        wrapped_keys = any(k.startswith("base_causallm") for k in saved)
        if wrapped_keys and not configs.coconut:
            raise UserError(
                f"load_model_path '{configs.load_model_path}': holds Coconut weights (base_causallm.*) "
                "but coconut is off"
            )
        deferred = wrapped_keys  # Coconut weights load into the wrapper, below
        if not deferred:
            load_weights(model, saved, configs.load_model_path)

    if not (configs.cot or configs.no_thoughts or configs.no_cot):
        init_latent_embeddings(model, tokenizer)
    if configs.no_thoughts:
        configs.c_thought = 0
        configs.coconut = False
    if configs.coconut:
        model = wrap_coconut(model, ids, tokenizer, configs)
    if deferred:
        check_projection_keys(saved, configs)
        load_weights(model, saved, configs.load_model_path)
    if configs.bf16:
        model.to(torch.bfloat16)
    return model, tokenizer, ids


def wrap_coconut(model, ids, tokenizer, configs):
    """Step 6, with the ablation and feedback-variant keywords (their
    defaults are the reference wrapper)."""
    try:
        return Coconut(
            model, ids["<|latent|>"], ids["<|start-latent|>"], ids["<|end-latent|>"], tokenizer.eos_token_id,
            pause_as_thought=configs.pause_as_thought, latent_layer=configs.latent_layer,
            latent_norm=configs.latent_norm, latent_projection=configs.latent_projection,
        )
    except ValueError as e:  # latent_layer beyond this model's depth
        raise UserError(f"key 'latent_layer' with model_id '{configs.model_id}': {e}") from None


def check_projection_keys(saved, configs):
    """A checkpoint trained with latent_projection holds weights a run
    without it would silently drop. (The other way round is allowed: the
    projection starts at the identity, so a plain Coconut checkpoint
    continues unchanged.)"""
    if not configs.latent_projection and any(k.startswith("latent_projection.") for k in saved):
        raise UserError(
            f"load_model_path '{configs.load_model_path}': holds latent_projection weights but latent_projection is off"
        )


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


def plain_model(model):
    return model.base_causallm if isinstance(model, Coconut) else model


def is_sharded(module):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# ------------------------------------------------------------- checkpoints
def full_state_dict(parallel):
    """The reference state-dict format (wrapper keys for Coconut); gathered
    on every rank when sharded, so call it on all ranks."""
    if is_sharded(parallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(parallel, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(parallel).state_dict()


def gather_rng_states():
    """Every rank's RNG state, in rank order (a collective when distributed)."""
    state = checkpoints.rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(parallel, optimizer, configs, progress, epoch, batches_done=0):
    """Weights in the reference format, and beside them what continuing
    needs. Collective: call it on every rank."""
    weights = full_state_dict(parallel)
    optim = checkpoints.optimizer_state(parallel, optimizer) if optimizer is not None else None
    rng = gather_rng_states()
    name = checkpoints.name_for(epoch, batches_done)
    if is_main_process():
        state = dict(progress, epoch=epoch + (batches_done == 0), batches_done=batches_done,
                     optimizer=optim, rng=rng, config=dict(configs))
        checkpoints.write(run_folder(configs), name, weights, state)
        checkpoints.prune(run_folder(configs), configs.keep_last, keep={progress.get("best_name")})
        print(f"saving model to {os.path.join(run_folder(configs), name)}", flush=True)
    barrier()
    del weights, optim
    gc.collect()
    return name


# ------------------------------------------------------------------- wandb
def init_wandb(configs, run_id=None):
    """Online with a login; otherwise offline, saying so in one line. A
    resumed run continues the wandb run `run_id`."""
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not has_wandb_login():
        mode = "offline"
        print0("wandb: no login found, logging offline (run `wandb login` or set WANDB_API_KEY to log online)")
    try:
        run = wandb.init(
            project=configs.project, name=configs.name, mode=mode, config=dict(configs), id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as e:  # no network, bad key: the training must go on
        print0(f"wandb: could not start ({type(e).__name__}); logging offline")
        run = wandb.init(project=configs.project, name=configs.name, mode="offline", config=dict(configs), id=run_id)
    return run


def has_wandb_login():
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def log_batch_table(run, table, batch, tokenizer, step):
    """One table row per epoch: every position's id, label and token."""
    lines = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        lines += [f"{i} {l} {tokenizer.decode([i])}" for i, l in zip(ids, labels)]
        lines.append("=" * 40)
    table.add_data(step, "\n".join(lines) + "\n")
    run.log({"data_table": copy.copy(table)})


class Logger:
    """Where metrics go: wandb (main process, not in debug or only_eval runs)
    and the run's metrics file (main process). Other ranks get one that drops
    everything."""

    def __init__(self, wandb_run=None, metrics_log=None):
        self.wandb_run, self.metrics_log = wandb_run, metrics_log
        self.table = None
        if wandb_run is not None:
            import wandb

            self.table = wandb.Table(columns=["step", "text"])

    def log(self, values, stage, epoch, step, when=None, **extra):
        if self.wandb_run is not None:
            self.wandb_run.log(values)
        if self.metrics_log is not None:
            self.metrics_log.log(values, stage, epoch, step, when=when, **extra)

    def batch_table(self, batch, tokenizer, step):
        if self.wandb_run is not None:
            log_batch_table(self.wandb_run, self.table, batch, tokenizer, step)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.metrics_log is not None:
            self.metrics_log.close()


def open_logger(configs, progress, first_batch):
    """The main process's Logger; a resumed run continues its wandb run and
    its metrics file from the point it resumes at."""
    if not is_main_process():
        return Logger()
    wandb_run = None
    if not configs.debug and not configs.only_eval:
        wandb_run = init_wandb(configs, progress["wandb_id"])
        progress["wandb_id"] = wandb_run.id
    start = (configs.resume, first_batch)
    return Logger(wandb_run, metrics.MetricsLog(run_folder(configs), start, only_eval=configs.only_eval))


def print_stage_summary(logger):
    """Validation accuracy at the last epoch of every stage, from the run's
    whole metrics history (earlier sessions of a resumed run included)."""
    if logger.metrics_log is None:
        return
    rows = metrics.accuracy_by_stage(metrics.read(logger.metrics_log.path))
    if rows:
        print("Accuracy by stage (last epoch of each):", flush=True)
        for stage, epoch, acc in rows:
            print(f"  stage {stage} (epoch {epoch}): {acc:.4f}", flush=True)


# ----------------------------------------------------------------- training
def build_optimizer(parallel, configs):
    return torch.optim.AdamW(parallel.parameters(), lr=configs.lr, weight_decay=configs.weight_decay)


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
    (no padding) when nothing is sharded or every sequence is alike."""
    coconut = as_coconut(parallel)
    if coconut is None or coconut.pause_as_thought or not is_sharded(parallel) or not hasattr(dataset, "max_latents"):
        return 0
    return dataset.max_latents()


def as_coconut(parallel):
    module = unwrap(parallel)
    return module if isinstance(module, Coconut) else None


class NonFiniteLoss(Exception):
    """Training diverged; the run stops without saving that state."""


def precision(configs, device):
    """bf16 autocast for `mixed_precision` (weights and AdamW state stay
    float32); nothing otherwise."""
    if configs.mixed_precision:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class PendingLosses:
    """Training losses kept on the device between sync points, so that a
    batch costs no host sync and no collective. `flush` reads them all at
    once, stops every rank together if any rank had a non-finite loss (one
    all-reduce), and logs each batch under its own step, as if logged when
    it ran."""

    def __init__(self, configs, epoch, total, stage, logger, pbar):
        self.configs, self.epoch, self.total, self.stage = configs, epoch, total, stage
        self.logger, self.pbar = logger, pbar
        self.steps, self.losses, self.times = [], [], []

    def add(self, step, loss):
        self.steps.append(step)
        self.losses.append(loss.detach().float())
        self.times.append(time.monotonic())

    def __len__(self):
        return len(self.steps)

    def flush(self):
        if not self.steps:
            return
        losses = torch.stack(self.losses)
        bad = all_reduce_max_tensor((~torch.isfinite(losses)).int())
        values, bad = losses.tolist(), bad.tolist()  # the host sync
        steps, times, self.steps, self.losses, self.times = self.steps, self.times, [], [], []
        epoch, total = self.epoch, self.total
        for step, value, not_finite, when in zip(steps, values, bad, times):
            if not_finite:  # on some rank: every rank stops at this flush
                raise NonFiniteLoss(f"non-finite training loss at epoch {epoch + 1}, batch {step}: stopping without saving")
            full_loss = value * self.configs.gradient_accumulation_steps
            row = {"train/epoch": epoch + 1, "train/step": epoch * total + step, "train/loss": full_loss}
            self.logger.log(row, self.stage, epoch + 1, epoch * total + step, when=when, batch=step)
        self.pbar.set_description(f"Training Epoch: {epoch + 1}/{self.configs.num_epochs}, batch {steps[-1]}/{total} (loss: {full_loss:.4f})")


def train_epoch(parallel, optimizer, batches, configs, epoch, stage, device, logger, tokenizer, first=0, save=None):
    """One pass over `batches`, which start at batch `first` of the epoch.
    `save(batches_done)` is called every `save_every_steps` optimizer steps.
    Losses are read (logged, checked) every `sync_every` batches and before
    every save, so a diverged state is never saved. Returns the number of
    batches in the whole epoch."""
    parallel.train()
    accumulate = configs.gradient_accumulation_steps
    total = first + len(batches)
    pbar = tqdm(total=total // accumulate, initial=first // accumulate, desc=f"Training Epoch: {epoch + 1}",
                unit="step", disable=not is_main_process(), dynamic_ncols=True)
    pending = PendingLosses(configs, epoch, total, stage, logger, pbar)
    coconut = as_coconut(parallel)
    min_passes = passes_in_step(parallel, getattr(batches, "dataset", None))
    started = time.perf_counter()
    try:
        for step, batch in enumerate(batches, start=first):
            if step == 0:
                logger.batch_table(batch, tokenizer, epoch * total)
            with precision(configs, device):
                loss = parallel(**model_inputs(batch, device, coconut, min_passes)).loss / accumulate
            pending.add(step, loss)
            loss.backward()
            saving = False
            if (step + 1) % accumulate == 0 or step == total - 1:
                optimizer.step()
                optimizer.zero_grad()
                pbar.update(1)
                n_steps = (step + 1) // accumulate
                saving = bool(save and configs.save_every_steps and n_steps % configs.save_every_steps == 0 and step < total - 1)
            if saving or len(pending) >= configs.sync_every or step == total - 1:
                pending.flush()
            if saving:
                save(step + 1)
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
def validation_loss(parallel, loader, world, device, configs):
    """Mean over batches of the loss averaged over ranks, read once at the end."""
    parallel.eval()
    coconut = as_coconut(parallel)
    min_passes = passes_in_step(parallel, loader.dataset)
    losses = []
    for batch in tqdm(loader, desc="Validation loss", unit="batch", disable=not is_main_process(), dynamic_ncols=True):
        with precision(configs, device):
            losses.append(parallel(**model_inputs(batch, device, coconut, min_passes)).loss.detach().float())
    total = 0.0
    if losses:  # summed in the order and precision of a per-batch reading
        for loss in all_reduce_sum(torch.stack(losses)).tolist():
            total += loss / world
    return total / max(len(loader), 1)


# --------------------------------------------------------------- evaluation
def extract_answer(text):
    return text.split("#")[-1].replace(",", "").strip()


def extract_cot(text):
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def shard_batches(dataset, batch_size, rank, world):
    """Every sample exactly once over all ranks (rank r takes r, r+world, ...),
    and every rank the same number of batches (short ranks get None)."""
    indices = list(range(rank, len(dataset), world))
    per_rank = -(-len(dataset) // world)
    n_batches = -(-per_rank // batch_size)
    batches = [indices[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    return [b if b else None for b in batches]


@torch.no_grad()
def evaluate(parallel, dataset, raw_samples, collator, tokenizer, configs, rank, world, device, max_new_tokens, records=None,
             generator=None):
    """Greedy generation on every validation sample; returns (accuracy, CoT
    match) over all ranks. `records`, if a list, receives this rank's
    (sample index, decoded output, number of generated tokens) triples.
    `generator` is the Coconut that decodes (default: made here)."""
    generator = generator or decoder_for(unwrap(parallel), tokenizer)
    sharded = is_sharded(parallel)
    generator.eval()
    batches = shard_batches(dataset, configs.batch_size_eval, rank, world)
    correct = torch.zeros(3, dtype=torch.long, device=device)  # answer, CoT, total
    printed = 0
    pbar = tqdm(total=len(batches), desc="Test Accuracy", unit="batch", disable=not is_main_process(), dynamic_ncols=True)
    with parallel_unsharded(parallel) if sharded else nullcontext():
        for indices in batches:
            dummy = indices is None  # keeps model calls equal across ranks
            batch = collator([dataset[i] for i in (indices or [0])])
            outputs = generator.generate(
                batch["input_ids"].to(device), batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, synced_gpus=sharded, rank_max=all_reduce_max,
            )
            outputs = list(outputs) if batch["input_ids"].shape[0] > 1 else [outputs[0]]
            prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()  # outputs start with the unpadded prompt
            for sample_idx, output, prompt_length in zip(batch["idx"].tolist(), outputs, prompt_lengths):
                if dummy:
                    break
                sample = raw_samples[sample_idx]
                text = tokenizer.decode(output, skip_special_tokens=True)
                if records is not None:
                    records.append((sample_idx, text, len(output) - prompt_length))
                answer = sample["answer"].replace(",", "").strip()
                correct[0] += extract_answer(text) == answer
                correct[1] += extract_cot(text) == "\n".join(sample["steps"])
                correct[2] += 1
                if printed < 5 and rank == 0:
                    printed += 1
                    print(f"Question {sample_idx}: Answer = '{answer}' CoT = '{chr(10).join(sample['steps'])}'")
                    print(f"Full output: '{tokenizer.decode(output)}'")
                    print(f"Extracted Output: '{extract_answer(text)}'", flush=True)
            pbar.update(1)
            pbar.set_description(f"Test accuracy: {float(correct[0]) / max(int(correct[2]), 1):.2f}")
    pbar.close()
    print(f"Device {rank}: Cor={int(correct[0])}, CoT={int(correct[1])}, Total={int(correct[2])}", flush=True)
    cor, cor_cot, total = all_reduce_sum(correct).tolist()
    print0(f"Accuracy on validation set: {cor} / {total} = {cor / total}")
    print0(f"CoT match on validation set: {cor_cot} / {total} = {cor_cot / total}")
    return cor / total, cor_cot / total


def decoder_for(model, tokenizer):
    """The model's Coconut; a plain LM decodes through the same greedy loop
    (no latents to fill)."""
    return model if isinstance(model, Coconut) else Coconut(model, *(-1,) * 3, tokenizer.eos_token_id)


@contextmanager
def parallel_unsharded(module):
    """Keeps the root shard unit gathered while generating: generation calls
    the embedding directly, outside the root module's forward hooks."""
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


# -------------------------------------------------------------------- speed
def fast_path_mode(configs, device):
    """'compiled', 'static' or 'eager': `auto` compiles on a GPU and keeps
    the eager reference path on a CPU (compiling there costs more than it
    saves)."""
    if configs.fast_path == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return configs.fast_path


def set_up_fast_path(model, tokenizer, configs, device, world):
    """Turns on the Coconut fast path the config asks for; returns the
    Coconut that evaluation decodes with. The training passes are compiled
    in a single process only (sharded blocks keep their eager calls)."""
    decoder = decoder_for(model, tokenizer)
    mode = fast_path_mode(configs, device)
    if mode == "eager":
        return decoder
    reason = fast_path_unsupported(plain_model(model))
    if reason:
        if configs.fast_path != "auto":
            raise UserError(f"key 'fast_path' is {configs.fast_path!r}, but model_id '{configs.model_id}' cannot take it: {reason}")
        print0(f"fast path: eager for this model ({reason})")
        return decoder
    if mode == "compiled":
        import torch._dynamo

        # a frame that fails to compile runs eagerly instead of stopping the run
        torch._dynamo.config.suppress_errors = True
        # one compilation per pass kind, train/eval, precision, and decoding batch shape
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    decoder.use_fast_path(compile=mode == "compiled", compile_training=world == 1)
    print0(f"fast path: {mode} (fast_path: {configs.fast_path}; fast_path: eager is the reference path)")
    return decoder


def set_tf32(configs, device):
    """TF32 matmuls, only when asked for (the reference computes in full
    float32; torch's default). A GPU setting: a CPU run is unchanged."""
    if not configs.tf32 or device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    print0("tf32: on (TF32 matmuls; the reference computes in full float32)")


# --------------------------------------------------------------------- main
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


def data_options(configs):
    return dict(columns=configs.data_columns, data_format=configs.data_format)


def load_data(configs):
    """Read and check the data sources before anything is built or written;
    returns the validation samples."""
    with main_process_first():
        raw_val = load_samples(configs.val_path, **data_options(configs))
        if not configs.only_eval:
            load_samples(configs.train_path, **data_options(configs))
    return raw_val


def in_run_folder(path, configs):
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(run_folder(configs))


def restore_progress(configs, parallel, optimizer, rank):
    """The training state saved beside the weights being resumed: best
    accuracy, wandb run id, RNG, and the optimizer (unless a fresh one is due
    anyway). A weights-only (reference) checkpoint restores nothing, and so
    does one from another run's folder: a warm start (a CoT checkpoint
    starting a Coconut run) takes its weights only, as the reference does,
    and is a run of its own."""
    progress = {"best_acc": 0.0, "best_name": None, "wandb_id": None}
    if configs.load_model_path == "None" or configs.only_eval or not in_run_folder(configs.load_model_path, configs):
        return progress, optimizer
    try:
        state = checkpoints.read_state(configs.load_model_path, allow_pickle=configs.legacy_state_files)
    except checkpoints.UnsafeStateFile:
        raise UserError(
            f"{configs.load_model_path}.state: holds objects that safe loading refuses (a file from before 2026-12-05, "
            "or not from coconut); set legacy_state_files: True to read it, only if you trust its source"
        ) from None
    except Exception as e:  # a corrupt side file must not be half-used
        raise UserError(f"{configs.load_model_path}.state: not a readable training state ({type(e).__name__})") from None
    if state is None:
        return progress, optimizer
    progress.update({k: state[k] for k in progress if k in state})
    rngs = state["rng"]
    checkpoints.restore_rng(rngs[rank] if rank < len(rngs) else rngs[0])
    if state["optimizer"] is not None and (state["batches_done"] or not configs.reset_optimizer):
        optimizer = optimizer or build_optimizer(parallel, configs)
        checkpoints.load_optimizer_state(parallel, optimizer, state["optimizer"])
    return progress, optimizer


def save_resolved_config(configs):
    """The config as run (defaults and overrides applied), beside the checkpoints."""
    if is_main_process() and not configs.debug and not configs.only_eval:
        import yaml

        os.makedirs(run_folder(configs), exist_ok=True)
        with open(os.path.join(run_folder(configs), "config.yaml"), "w") as f:
            yaml.safe_dump(dict(configs), f, sort_keys=False)


def epoch_batches(dataset, configs, collator, rank, world, device, skip=0):
    """This rank's batches of a dataset, in the same order on every run, from
    batch `skip` on (a mid-epoch resume)."""
    from torch.utils.data import DataLoader, DistributedSampler

    indices = list(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False))
    # on a GPU one worker lays out and pads the next batches during the step;
    # on a CPU it would only take a core from the model
    workers = 1 if device.type == "cuda" else 0
    # its own generator: a loader draws a seed when iterated, and drawing it
    # from the global RNG would shift dropout after a mid-epoch resume
    return DataLoader(dataset, batch_size=configs.batch_size_training, sampler=indices[skip * configs.batch_size_training :],
                      collate_fn=collator, num_workers=workers, pin_memory=workers > 0, generator=torch.Generator())


def train_size(configs):
    """How many samples of train_path to train on, from its start."""
    size = configs.train_samples or 100000000
    return min(size, 5000) if configs.debug else size


def max_new_tokens(configs):
    """The reference's generation budget: 64 new tokens for GSM8K, else 128."""
    return 64 if "gsm" in configs.val_path else 128


def stage_for_epoch(configs, epoch):
    """The curriculum stage of 0-based `epoch`, for training and evaluation.
    `no_curriculum`: the final stage, max_latent_stage + 1 (all steps
    replaced by max_latent_stage thought slots), from the first epoch."""
    if configs.cot or configs.no_cot:
        return 0
    if configs.no_curriculum:
        return configs.max_latent_stage + 1
    return epoch // configs.epochs_per_stage


def run(configs, rank, world, device):
    set_seed(configs.seed)
    first_batch = find_resume_checkpoint(configs)
    raw_val = load_data(configs)
    model, tokenizer, ids = build_model(configs)
    parallel = wrap_model(model, configs, world, device)
    set_tf32(configs, device)
    decoder = set_up_fast_path(model, tokenizer, configs, device, world)
    start_id, end_id, latent_id = ids["<|start-latent|>"], ids["<|end-latent|>"], ids["<|latent|>"]

    with main_process_first():
        if not configs.only_eval:
            base_train = get_dataset(configs.train_path, tokenizer, max_size=train_size(configs), **data_options(configs))
        base_valid = get_dataset(configs.val_path, tokenizer, max_size=32 if configs.debug else 100000000, **data_options(configs))
    new_tokens = max_new_tokens(configs)
    markerless = configs.cot or configs.no_cot or configs.no_thoughts

    optimizer = None if configs.reset_optimizer else build_optimizer(parallel, configs)
    progress, optimizer = restore_progress(configs, parallel, optimizer, rank)
    save_resolved_config(configs)
    logger = open_logger(configs, progress, first_batch)
    collator = MyCollator(tokenizer, latent_id=latent_id, label_pad_token_id=-100)
    saving = not configs.debug

    for epoch in range(configs.resume, configs.num_epochs):
        stage = stage_for_epoch(configs, epoch)
        gen_set = get_question_latent_dataset(stage, base_valid, configs, start_id, latent_id, end_id, no_special_marker=markerless)
        if not configs.only_eval:
            # the order is drawn from (seed, epoch) alone, identical on every rank
            train_set = get_cot_latent_dataset(
                stage, base_train, configs, start_id, latent_id, end_id,
                no_special_marker=markerless, shuffle=True, seed=configs.seed * 100003 + epoch,
            )
            loss_set = get_cot_latent_dataset(stage, base_valid, configs, start_id, latent_id, end_id, no_special_marker=markerless)
            if configs.reset_optimizer and (first_batch == 0 or optimizer is None):
                optimizer = build_optimizer(parallel, configs)
            batches = epoch_batches(train_set, configs, collator, rank, world, device, skip=first_batch)
            save_partial = (lambda done: save_checkpoint(parallel, optimizer, configs, progress, epoch, done)) if saving else None
            per_epoch = train_epoch(parallel, optimizer, batches, configs, epoch, stage, device, logger, tokenizer, first_batch, save_partial)
            first_batch = 0
            if not configs.save_only_improve and saving:
                save_checkpoint(parallel, optimizer, configs, progress, epoch)
            val_loss = validation_loss(parallel, epoch_batches(loss_set, configs, collator, rank, world, device), world, device, configs)
            print0(f"eval loss {val_loss}")
            logger.log({"eval/loss": val_loss}, stage, epoch + 1, (epoch + 1) * per_epoch)

        with precision(configs, device):
            acc, cot_em = evaluate(parallel, gen_set, raw_val, collator, tokenizer, configs, rank, world, device, new_tokens,
                                   generator=decoder)
        steps_done = 0 if configs.only_eval else (epoch + 1) * per_epoch
        logger.log({"eval/acc": acc, "eval/cot_em": cot_em}, stage, epoch + 1, steps_done)
        if configs.only_eval:
            break
        if acc > progress["best_acc"]:
            progress.update(best_acc=acc, best_name=checkpoints.name_for(epoch))
            if configs.save_only_improve and saving:
                save_checkpoint(parallel, optimizer, configs, progress, epoch)
    print_stage_summary(logger)
    logger.close()
    # every rank reaches the process group's teardown together: a rank that
    # tears gloo down while another is still finishing can abort at exit
    barrier()


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other user error
        raise UserError(f"command line: {message} (usage: run.py CONFIG.yaml [key=value ...])")


def parse_args(argv):
    parser = ArgumentParser(description="Train or evaluate a Coconut model.")
    parser.add_argument("config_file", help="YAML run config (see args/)")
    parser.add_argument("overrides", nargs="*", help="key=value pairs that override the config")
    return parser.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        configs = load_config(args.config_file, args.overrides)
        rank, world, device = init_distributed()
        print0("Config:", dict(configs))
        run(configs, rank, world, device)
    except UserError as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
