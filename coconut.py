"""The Coconut wrapper: a causal LM whose `<|latent|>` positions take, as input
embedding, the last hidden state of the position before them (continuous
thoughts), trained and decoded with a shared KV cache.

This module owns the model wrapper only: no files, no torch.distributed, no
training loop. See SPEC sections 5 and 6.
"""

import inspect
from collections import namedtuple

import torch
import torch.nn as nn
from transformers import DynamicCache

Outputs = namedtuple("Outputs", ["loss", "inputs_embeds", "logits"])

# Upper bound on latent passes, used to give every rank the same number of
# model calls during synced generation (the reference's padding rule).
MAX_N_LATENT = 8

# what `latent_norm` may be: nothing, RMS rescaling to the embedding scale, a
# parameter-free layer norm
LATENT_NORMS = ("none", "rms", "layernorm")


def latent_columns(input_ids, latent_token_id):
    """Column of each row's k-th latent token, shape (B, max latents), -1 where
    a row has fewer; computed without Python loops over rows or positions."""
    is_latent = input_ids == latent_token_id
    counts = is_latent.sum(dim=1)
    max_count = int(counts.max()) if input_ids.numel() else 0  # host sync
    columns = torch.full((input_ids.shape[0], max_count), -1, dtype=torch.long, device=input_ids.device)
    if max_count:
        rows, cols = is_latent.nonzero(as_tuple=True)
        rank_in_row = is_latent.cumsum(dim=1)[rows, cols] - 1
        columns[rows, rank_in_row] = cols
    return columns


def positions_from_mask(attention_mask):
    """Position ids as the collator builds them: 0, 1, ... from each row's
    first attended token, 0 on padding."""
    positions = attention_mask.long().cumsum(dim=1) - 1
    return positions.clamp(min=0) * (attention_mask != 0)


class Coconut(nn.Module):
    """The wrapper. The keywords after `eos_token_id` are extensions; their
    defaults give the reference method (SPEC section 5):

    - `pause_as_thought`: latent positions keep their own (`<|latent|>`)
      embedding, nothing is fed back, and the forward pass is one ordinary
      pass (the "pause as thought" ablation, SPEC section 9).
    - `latent_layer`: index into the model's `hidden_states` (embeddings
      output, then one per block) of the vector fed back; -1, the last
      layer after the final norm, is the reference.
    - `latent_norm`: "none"; "rms" rescales each fed-back vector so its RMS
      is the mean RMS of the input-embedding rows (so its norm is the mean
      row norm), read from the table at forward time: the table trains, and
      run.py loads checkpoints after wrapping; "layernorm" applies a layer
      norm without parameters (no new state-dict keys; with
      `latent_projection` after it, the learned affine map is there).
    - `latent_projection`: a learned square linear map, identity at
      initialisation, after the norm. Only then does the wrapper hold
      parameters (and state-dict keys) of its own.
    """

    def __init__(
        self,
        base_causallm,
        latent_token_id,
        start_latent_id,
        end_latent_id,
        eos_token_id,
        pause_as_thought=False,
        latent_layer=-1,
        latent_norm="none",
        latent_projection=False,
    ):
        super().__init__()
        self.gen_forward_cnt = 0
        self.base_causallm = base_causallm
        self.latent_token_id = latent_token_id
        self.eos_token_id = eos_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.embedding = base_causallm.get_input_embeddings()
        # transformers >= 5.24 names the cache argument `cache`; older 5.x
        # releases call it `past_key_values`.
        parameters = inspect.signature(base_causallm.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

        if latent_layer != -1:  # -1 (the reference) exists for every model
            n_states = base_causallm.config.num_hidden_layers + 1  # embeddings output, then every block
            if not -n_states <= latent_layer < n_states:
                raise ValueError(f"latent_layer {latent_layer} is out of range: the model has hidden states {-n_states} .. {n_states - 1}")
        if latent_norm not in LATENT_NORMS:
            raise ValueError(f"latent_norm must be one of {', '.join(LATENT_NORMS)}, got {latent_norm!r}")
        self.pause_as_thought = pause_as_thought
        self.latent_layer = latent_layer
        self.latent_norm = latent_norm
        if latent_projection:
            weight = self.embedding.weight
            width = weight.shape[1]
            # registered only when asked for: default checkpoints keep the reference keys
            self.latent_projection = nn.Linear(width, width, device=weight.device, dtype=weight.dtype)
            nn.init.eye_(self.latent_projection.weight)
            nn.init.zeros_(self.latent_projection.bias)
        else:
            self.latent_projection = None

    def _cache_argument(self, cache):
        return {self._cache_name: cache}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        logits, inputs_embeds, _ = self._continuous_forward(input_ids, attention_mask, position_ids)
        loss = None
        if labels is not None:
            # logits at column t predict the label at column t + 1
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return Outputs(loss=loss, inputs_embeds=inputs_embeds, logits=logits)

    def _continuous_forward(self, input_ids, attention_mask, position_ids, cache=None):
        """Run the latent passes over one shared cache.

        Pass 0 covers columns [0, first latent); each later pass covers one
        column, after which the next latent of every row that has one is filled
        with the hidden state of the column to its left; a last pass covers the
        rest. Returns (logits over all columns, filled input embeddings, cache).
        """
        columns = latent_columns(input_ids, self.latent_token_id)
        if self.pause_as_thought:  # latents keep their embedding: one ordinary pass
            columns = columns[:, :0]
        n_passes = columns.shape[1]
        inputs_embeds = self.embedding(input_ids)
        cache = cache if cache is not None else DynamicCache(config=self.base_causallm.config)
        width = input_ids.shape[1]
        start = 0
        end = int(columns[columns >= 0].min()) if n_passes else width  # host sync
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        # the "rms" target, read once per call from the embedding table as it
        # is now (it trains, and checkpoints load after construction)
        scale = self._embedding_rms() if self.latent_norm == "rms" and n_passes else None
        logits = []
        for pass_idx in range(n_passes + 1):
            outputs = self.base_causallm(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=position_ids[:, start:end],
                **self._cache_argument(cache),
                use_cache=True,
                output_hidden_states=pass_idx < n_passes,
            )
            logits.append(outputs.logits)
            if pass_idx < n_passes:
                inputs_embeds = self._fill_latents(
                    inputs_embeds, outputs.hidden_states[self.latent_layer], columns[:, pass_idx], rows, start, scale
                )
                start, end = end, (end + 1 if pass_idx + 1 < n_passes else width)
        self.gen_forward_cnt += n_passes + 1
        return torch.cat(logits, dim=1), inputs_embeds, cache

    def _fill_latents(self, inputs_embeds, hidden, target_columns, rows, offset, scale=None):
        """Out of place (autograd has saved views of the old tensor): put, for
        every row whose target column is >= 0, the hidden state computed at
        target - 1 (through the feedback variant, if any) into inputs_embeds
        at target."""
        has = target_columns >= 0
        rows, target = rows[has], target_columns[has]
        source = target - 1 - offset
        if bool(((source < 0) | (source >= hidden.shape[1])).any()):
            raise ValueError(
                "latent tokens are not aligned across the batch; batch rows with MyCollator"
            )
        thoughts = hidden[rows, source]  # (rows with a latent here, width)
        if self.latent_norm != "none" or self.latent_projection is not None:
            thoughts = self._feedback_variant(thoughts, scale)
        return inputs_embeds.index_put((rows, target), thoughts.to(inputs_embeds.dtype))

    @torch.no_grad()
    def _embedding_rms(self):
        """Mean over the input-embedding rows of each row's RMS, a float32
        scalar; a constant to the fed-back vectors, so no gradient reaches
        the table through it."""
        table = self.embedding.weight
        norms = torch.linalg.vector_norm(table, dim=1, dtype=torch.float32)
        return norms.mean() / table.shape[1] ** 0.5

    def _feedback_variant(self, thoughts, scale):
        """Norm, then projection, of the fed-back vectors (n, width). Only the
        gathered vectors are transformed, never a whole pass."""
        if self.latent_norm == "rms":
            wide = thoughts.float()
            rms = wide.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
            thoughts = (wide * (scale / rms)).to(thoughts.dtype)
        elif self.latent_norm == "layernorm":
            thoughts = nn.functional.layer_norm(thoughts.float(), thoughts.shape[-1:]).to(thoughts.dtype)
        if self.latent_projection is not None:
            thoughts = self.latent_projection(thoughts)
        return thoughts

    # --------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask,
        max_new_tokens=16,
        output_embedding=False,
        synced_gpus=False,
        rank_max=None,
        **kwargs,
    ):
        """Greedy decoding with a KV cache.

        Takes a batch as MyCollator builds it (padding on either side). With
        one row, returns a (1, L) tensor: prompt ids then new ids, as the
        reference. With several rows, returns a list of 1-D tensors, each the
        row's unpadded prompt then its new ids, equal to what that row gets
        alone. `synced_gpus` keeps the number of model calls equal on every
        rank (sharded parameters are gathered in each call): by padding to
        max_new_tokens + MAX_N_LATENT calls as the reference, or, when
        `rank_max` (int -> max of it over all ranks) is given, by stopping
        all ranks together as soon as every rank is done.
        """
        self.gen_forward_cnt = 0
        attention_mask = attention_mask.to(input_ids.device)
        position_ids = positions_from_mask(attention_mask)
        logits, prompt_embeds, cache = self._continuous_forward(input_ids, attention_mask, position_ids)
        synced = rank_max if synced_gpus and rank_max is not None else None
        if synced:
            # pad the latent passes up to the most any rank makes, so the
            # per-token agreement below happens at the same call on all ranks
            for _ in range(synced(self.gen_forward_cnt) - self.gen_forward_cnt):
                self._idle_call(input_ids[:, :1])

        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last_column = (torch.arange(input_ids.shape[1], device=input_ids.device) * (attention_mask != 0)).argmax(dim=1)
        first = logits[rows, last_column].argmax(dim=-1)  # always kept
        new_tokens, kept = self._decode(first, position_ids[rows, last_column] + 1, attention_mask, cache, max_new_tokens, synced)
        if synced_gpus and not synced:
            while self.gen_forward_cnt < max_new_tokens + MAX_N_LATENT:
                self._idle_call(input_ids[:, :1])
        return self._assemble(input_ids, attention_mask, prompt_embeds, new_tokens, kept, output_embedding)

    def _decode(self, next_tokens, next_positions, mask, cache, max_new_tokens, synced):
        """One token per call for every row; a row stops at its first eos
        (not kept). Returns the new tokens (B, n) on the CPU and the count
        each row keeps."""
        n_rows = next_tokens.shape[0]
        new_tokens = [next_tokens]
        alive = torch.ones(n_rows, dtype=torch.bool, device=next_tokens.device)
        kept = torch.ones(n_rows, dtype=torch.long, device=next_tokens.device)
        for _ in range(max_new_tokens - 1):
            any_alive = int(alive.any())  # host sync, once per token
            if (synced(any_alive) if synced else any_alive) == 0:
                break
            mask = torch.cat([mask, mask.new_ones(n_rows, 1)], dim=1)
            outputs = self.base_causallm(
                inputs_embeds=self.embedding(next_tokens[:, None]),
                attention_mask=mask,
                position_ids=next_positions[:, None],
                **self._cache_argument(cache),
                use_cache=True,
            )
            self.gen_forward_cnt += 1
            next_tokens = outputs.logits[:, -1].argmax(dim=-1)
            next_positions = next_positions + 1
            alive = alive & (next_tokens != self.eos_token_id)
            kept = kept + alive.long()
            new_tokens.append(next_tokens)
        return torch.stack(new_tokens, dim=1).cpu(), kept.cpu()

    def _idle_call(self, input_ids):
        """A model call whose result is unused: keeps collectives in step."""
        self.gen_forward_cnt += 1
        self.base_causallm(inputs_embeds=self.embedding(input_ids))

    def _assemble(self, input_ids, attention_mask, prompt_embeds, new_tokens, kept, output_embedding):
        results, embeds = [], []
        real = attention_mask.bool()
        for row in range(input_ids.shape[0]):  # assembling outputs, not model work
            generated = new_tokens[row, : int(kept[row])]
            results.append(torch.cat([input_ids[row][real[row]].cpu(), generated]))
            if output_embedding:
                gen_embeds = self.embedding(generated.to(input_ids.device))
                embeds.append(torch.cat([prompt_embeds[row][real[row]], gen_embeds]))
        if input_ids.shape[0] == 1:
            results = results[0].view(1, -1)
            embeds = embeds[0].unsqueeze(0) if output_embedding else None
        return (results, embeds) if output_embedding else results
