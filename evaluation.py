"""Answer accuracy by greedy generation: the generation budget, answer and
chain-of-thought extraction, and evaluation sharded over ranks with every
validation sample counted once."""

from contextlib import nullcontext

import torch
from tqdm import tqdm

from build import decoder_for
from distributed import all_reduce_max, all_reduce_sum, is_sharded, parallel_unsharded, unwrap
from utils import is_main_process, print0


def token_budget(configs):
    """The reference's generation budget: 64 new tokens for GSM8K, else 128."""
    return 64 if "gsm" in configs.val_path else 128


def normalise_answer(text):
    """An answer as compared: commas dropped (1,000 is 1000), outer spaces stripped."""
    return text.replace(",", "").strip()


def extract_answer(text):
    """The generated answer: the text after the last #, normalised."""
    return normalise_answer(text.split("#")[-1])


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
def evaluate(parallel, dataset, raw_samples, configs, *, tokenizer, collator, process, max_new_tokens=None, records=None, generator=None):
    """Greedy generation on every prompt of `dataset` (answers and steps in
    `raw_samples`), this rank's share of them (`process`: a
    distributed.Process); returns (accuracy, CoT match) over all ranks.
    `max_new_tokens` defaults to the run's budget. `records`, if a list,
    receives this rank's (sample index, decoded output, number of generated
    tokens) triples. `generator` is the Coconut that decodes (default: made
    here)."""
    rank, device = process.rank, process.device
    max_new_tokens = max_new_tokens or token_budget(configs)
    generator = generator or decoder_for(unwrap(parallel), tokenizer)
    sharded = is_sharded(parallel)
    generator.eval()
    batches = shard_batches(dataset, configs.batch_size_eval, rank, process.world)
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
                answer = normalise_answer(sample["answer"])
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

