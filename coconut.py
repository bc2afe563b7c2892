"""The Coconut wrapper: a causal LM whose `<|latent|>` positions take, as input
embedding, the last hidden state of the position before them (continuous
thoughts), trained and decoded with a shared KV cache.

This module owns the model wrapper only (and reading its own export,
Coconut.from_pretrained): no torch.distributed, no training loop. See
docs/behaviour.md sections 5 and 6.
"""

import inspect
from collections import OrderedDict, namedtuple

import torch
import torch.nn as nn
from transformers import DynamicCache, StaticCache

from utils import LATENT_NORMS

Outputs = namedtuple("Outputs", ["loss", "inputs_embeds", "logits"])

# Where a batch's latents are: `columns` (B, max latents, -1 where a row has
# fewer; on the CPU), the first latent column, and the number of latent passes.
LatentPlan = namedtuple("LatentPlan", ["columns", "first", "n_passes"])

# Upper bound on latent passes, used to give every rank the same number of
# model calls during synced generation (the reference's padding rule).
MAX_N_LATENT = 8

# an exported Coconut (analysis.py export, Coconut.from_pretrained): the
# options beside the base model, and the projection's weights if any
EXPORT_FILE = "coconut.json"
PROJECTION_FILE = "latent_projection.safetensors"
FEEDBACK_OPTIONS = ("pause_as_thought", "latent_layer", "latent_norm", "latent_projection")


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


def latent_plan(input_ids, latent_token_id):
    """The batch's LatentPlan, computed on a CPU copy of the ids (the loader's
    batch in training: no device sync). Refuses latents that are not aligned
    across rows: row r's k-th latent must sit at the same column, first + k,
    as every other row's, which is how MyCollator pads."""
    columns = latent_columns(input_ids.cpu(), latent_token_id)
    if not columns.shape[1]:
        return LatentPlan(columns, input_ids.shape[1], 0)
    present = columns >= 0
    first = int(columns[present].min())
    expected = first + torch.arange(columns.shape[1])
    if first < 1 or not bool((columns == expected)[present].all()):
        raise ValueError("latent tokens are not aligned across the batch; batch rows with MyCollator")
    return LatentPlan(columns, first, columns.shape[1])


def attention_rows(key_ok, start, end):
    """The 4-D mask (B, 1, end - start, keys) of visible_keys for the
    queries at columns [start, end)."""
    return visible_keys(key_ok, torch.arange(start, end, device=key_ok.device))


def visible_keys(key_ok, queries):
    """A boolean 4-D attention mask (B, 1, len(queries), keys) for the
    queries at the given columns: causal, over the keys `key_ok` (B, keys)
    marks as real. A query always sees itself, so padding rows never attend
    to nothing (their outputs are unused, but must stay finite for the
    backward pass)."""
    keys = torch.arange(key_ok.shape[1], device=key_ok.device)
    queries = queries[:, None]
    visible = (keys <= queries) & (key_ok[:, None, :] | (keys == queries))
    return visible[:, None]


def fast_path_unsupported(model):
    """Why `model` cannot take the fast path (None when it can): the fast
    path passes its own 4-D boolean masks, which only SDPA attention reads as
    such, and knows no sliding windows."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"attention implementation {implementation!r} (the fast path needs 'sdpa')"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types) or getattr(config, "use_sliding_window", False):
        return "sliding-window attention layers"
    return None


def positions_from_mask(attention_mask):
    """Position ids as the collator builds them: 0, 1, ... from each row's
    first attended token, 0 on padding."""
    positions = attention_mask.long().cumsum(dim=1) - 1
    return positions.clamp(min=0) * (attention_mask != 0)


class Coconut(nn.Module):
    """The wrapper. The keywords after `eos_token_id` are extensions; their
    defaults give the reference method (docs/behaviour.md section 5):

    - `pause_as_thought`: latent positions keep their own (`<|latent|>`)
      embedding, nothing is fed back, and the forward pass is one ordinary
      pass (the "pause as thought" ablation, docs/behaviour.md section 9).
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
        # the fast path (use_fast_path); plain attributes, not modules, so the
        # state dict keeps the reference keys
        self.fast = False
        self._compiled_model = None  # the base model's forward, compiled, for training passes
        self._step = None  # the one-column step on a static cache, compiled or not
        self._static_caches = OrderedDict()  # (batch, capacity, autocast) -> StaticCache

    def _cache_argument(self, cache):
        return {self._cache_name: cache}

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """A Coconut exported by `analysis.py export`: the base model (any
        keywords go to AutoModelForCausalLM.from_pretrained), the latent
        token ids and feedback options from coconut.json, and the
        latent_projection weights if it has one. The tokenizer, with the
        latent tokens, loads with AutoTokenizer.from_pretrained(folder)."""
        import json
        import os

        from transformers import AutoModelForCausalLM

        with open(os.path.join(folder, EXPORT_FILE)) as f:
            meta = json.load(f)
        model = cls(
            AutoModelForCausalLM.from_pretrained(folder, **kwargs),
            meta["latent_token_id"], meta["start_latent_id"], meta["end_latent_id"], meta["eos_token_id"],
            **{key: meta[key] for key in FEEDBACK_OPTIONS},
        )
        if model.latent_projection is not None:
            from safetensors.torch import load_file

            weights = load_file(os.path.join(folder, PROJECTION_FILE))
            model.latent_projection.load_state_dict(weights)
        return model

    def use_fast_path(self, enabled=True, compile=True, compile_training=True):
        """Turn the fast path on or off. On: the latent passes get a 4-D mask
        built once per batch and no host sync between them; generation runs
        on a reused static KV cache whose one-column steps (latent passes and
        new tokens) go through one function, compiled with CUDA graphs on a
        GPU (`compile`). `compile_training` also compiles the model for the
        training passes (dynamic shapes, no CUDA graphs). Results equal the
        eager path's up to floating-point rounding; with compiled training,
        dropout draws its own random stream. Raises ValueError when the model
        does not support it (see fast_path_unsupported)."""
        if enabled:
            reason = fast_path_unsupported(self.base_causallm)
            if reason:
                raise ValueError(f"the fast path does not support this model: {reason}")
        self.fast = enabled
        self._static_caches.clear()
        self._compiled_model = self._step = None
        if not enabled:
            return
        self._step = self._one_column_step
        if compile:
            cuda = self.embedding.weight.device.type == "cuda"
            # CUDA graphs ("reduce-overhead") fit the step: its shapes are fixed per cache
            self._step = torch.compile(self._one_column_step, dynamic=False, mode="reduce-overhead" if cuda else None)
        if compile and compile_training:
            self._compiled_model = torch.compile(self._model_call, dynamic=True)

    def _model_call(self, **kwargs):
        return self.base_causallm(**kwargs)

    def plan(self, input_ids):
        """The batch's LatentPlan (no latent passes for pause_as_thought,
        whose latents keep their embedding wherever they sit)."""
        if self.pause_as_thought:
            return LatentPlan(torch.empty(input_ids.shape[0], 0, dtype=torch.long), input_ids.shape[1], 0)
        return latent_plan(input_ids, self.latent_token_id)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, plan=None, min_passes=0, **kwargs):
        """`plan`, if given, is `self.plan(input_ids)` computed by the caller
        on the CPU batch, which spares a device sync. `min_passes` (sharded
        training) makes at least that many latent passes' worth of base-model
        calls: every rank must make as many as the others, since each call
        gathers the sharded weights; the calls this batch does not need run
        on one token and add exactly zero to the loss. pause_as_thought makes
        no latent passes on any rank, so it needs none."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        plan = plan if plan is not None else self.plan(input_ids)
        pass_through = self._fast_forward if self.fast else self._continuous_forward
        logits, inputs_embeds = pass_through(input_ids, attention_mask, position_ids, plan)[:2]
        loss = None
        if labels is not None:
            # logits at column t predict the label at column t + 1
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        for _ in range(0 if self.pause_as_thought else min_passes - plan.n_passes):
            # a term of value zero: its backward, too, runs on every rank
            idle = self._idle_call(input_ids[:, :1]).logits.sum() * 0.0
            loss = idle if loss is None else loss + idle
        return Outputs(loss=loss, inputs_embeds=inputs_embeds, logits=logits)

    @staticmethod
    def _pass_bounds(plan, width):
        """[start, end) of each pass: up to the first latent, one column per
        later latent, then the rest."""
        if not plan.n_passes:
            return [(0, width)]
        ends = [plan.first + k for k in range(plan.n_passes)] + [width]
        return list(zip([0] + ends[:-1], ends))

    def _continuous_forward(self, input_ids, attention_mask, position_ids, plan, cache=None):
        """Run the latent passes over one shared cache (the eager path).

        Pass 0 covers columns [0, first latent); each later pass covers one
        column, after which the next latent of every row that has one is filled
        with the hidden state of the column to its left; a last pass covers the
        rest. Returns (logits over all columns, filled input embeddings, cache).
        """
        inputs_embeds = self.embedding(input_ids)
        cache = cache if cache is not None else DynamicCache(config=self.base_causallm.config)
        columns = plan.columns.to(input_ids.device)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        # the "rms" target, read once per call from the embedding table as it
        # is now (it trains, and checkpoints load after construction)
        scale = self._embedding_rms() if self.latent_norm == "rms" and plan.n_passes else None
        logits = []
        for pass_idx, (start, end) in enumerate(self._pass_bounds(plan, input_ids.shape[1])):
            outputs = self.base_causallm(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=position_ids[:, start:end],
                **self._cache_argument(cache),
                use_cache=True,
                output_hidden_states=pass_idx < plan.n_passes,
            )
            logits.append(outputs.logits)
            if pass_idx < plan.n_passes:
                inputs_embeds = self._fill_latents(
                    inputs_embeds, outputs.hidden_states[self.latent_layer], columns[:, pass_idx], rows, start, scale
                )
        self.gen_forward_cnt += plan.n_passes + 1
        return torch.cat(logits, dim=1), inputs_embeds, cache

    def _fill_latents(self, inputs_embeds, hidden, target_columns, rows, offset, scale=None):
        """Out of place (autograd has saved views of the old tensor): put, for
        every row whose target column is >= 0, the hidden state computed at
        target - 1 (through the feedback variant, if any) into inputs_embeds
        at target. (latent_plan has checked that target - 1 lies in this pass.)"""
        has = target_columns >= 0
        rows, target = rows[has], target_columns[has]
        thoughts = hidden[rows, target - 1 - offset]  # (rows with a latent here, width)
        if self.latent_norm != "none" or self.latent_projection is not None:
            thoughts = self._feedback_variant(thoughts, scale)
        return inputs_embeds.index_put((rows, target), thoughts.to(inputs_embeds.dtype))

    def _fast_forward(self, input_ids, attention_mask, position_ids, plan):
        """The passes of _continuous_forward without a host sync between
        them: the mask is built once and the model may be compiled."""
        cache = DynamicCache(config=self.base_causallm.config)
        mask = attention_rows(attention_mask.bool(), 0, input_ids.shape[1])
        call = self._compiled_model or self._model_call

        def run_pass(embeds, positions, start, end, feeds):
            outputs = call(
                inputs_embeds=embeds, attention_mask=mask[:, :, start:end, :end], position_ids=positions,
                **self._cache_argument(cache), use_cache=True, output_hidden_states=feeds,
            )
            return outputs.logits, outputs.hidden_states[self.latent_layer][:, -1] if feeds else None

        return self._fill_by_column(input_ids, position_ids, plan, run_pass)

    def _fill_by_column(self, input_ids, position_ids, plan, run_pass):
        """The latent passes of the fast path: `run_pass(embeds, positions,
        start, end, feeds)` runs columns [start, end) and gives (their logits,
        the fed-back hidden state of the last one when `feeds`); every row's
        thought is computed and kept only where the row has a latent, so
        nothing waits for the device. Returns (logits, filled embeddings)."""
        inputs_embeds = self.embedding(input_ids)
        has = (plan.columns >= 0).to(input_ids.device, non_blocking=True)
        scale = self._embedding_rms() if self.latent_norm == "rms" and plan.n_passes else None
        logits = []
        for pass_idx, (start, end) in enumerate(self._pass_bounds(plan, input_ids.shape[1])):
            feeds = pass_idx < plan.n_passes
            pass_logits, thought = run_pass(inputs_embeds[:, start:end], position_ids[:, start:end], start, end, feeds)
            logits.append(pass_logits)
            if feeds:  # the next latent sits at column `end`, right after this pass
                inputs_embeds = self._put_column(inputs_embeds, end, thought, has[:, pass_idx], scale)
        self.gen_forward_cnt += plan.n_passes + 1
        return torch.cat(logits, dim=1), inputs_embeds

    def _put_column(self, inputs_embeds, column, thought, has, scale):
        """inputs_embeds with column `column` set to `thought` (B, width),
        through the feedback variant, in the rows where `has`; out of place."""
        if self.latent_norm != "none" or self.latent_projection is not None:
            thought = self._feedback_variant(thought, scale)
        new = torch.where(has[:, None], thought.to(inputs_embeds.dtype), inputs_embeds[:, column])
        return torch.cat([inputs_embeds[:, :column], new[:, None], inputs_embeds[:, column + 1 :]], dim=1)

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
        plan = self.plan(input_ids)
        synced = rank_max if synced_gpus and rank_max is not None else None
        if synced:
            # first make up the prompt calls other ranks make and this one
            # does not (they hold more latents), so that every later
            # agreement comes after the same number of model calls on all ranks
            prompt_calls = plan.n_passes + 1
            for _ in range(synced(prompt_calls) - prompt_calls):
                self._idle_call(input_ids[:, :1])
        if self.fast and not synced_gpus:  # sharded models keep the eager calls that other ranks mirror
            logits, prompt_embeds, step = self._static_prompt(input_ids, attention_mask, position_ids, plan, max_new_tokens)
        else:
            logits, prompt_embeds, cache = self._continuous_forward(input_ids, attention_mask, position_ids, plan)
            step = _GrowingCacheSteps(self, attention_mask, cache)

        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last_column = (torch.arange(input_ids.shape[1], device=input_ids.device) * (attention_mask != 0)).argmax(dim=1)
        first = logits[rows, last_column].argmax(dim=-1)  # always kept
        new_tokens, kept = self._decode(first, position_ids[rows, last_column] + 1, step, max_new_tokens, synced)
        if synced_gpus and not synced:
            while self.gen_forward_cnt < max_new_tokens + MAX_N_LATENT:
                self._idle_call(input_ids[:, :1])
        return self._assemble(input_ids, attention_mask, prompt_embeds, new_tokens, kept, output_embedding)

    def _decode(self, next_tokens, next_positions, step, max_new_tokens, synced):
        """One token per call for every row (`step(tokens, positions)` gives
        the next logits); a row stops at its first eos (not kept). Returns the
        new tokens (B, n) on the CPU and the count each row keeps."""
        n_rows = next_tokens.shape[0]
        new_tokens = [next_tokens]
        alive = torch.ones(n_rows, dtype=torch.bool, device=next_tokens.device)
        kept = torch.ones(n_rows, dtype=torch.long, device=next_tokens.device)
        for _ in range(max_new_tokens - 1):
            any_alive = int(alive.any())  # host sync, once per token
            if (synced(any_alive) if synced else any_alive) == 0:
                break
            logits = step(next_tokens, next_positions)
            self.gen_forward_cnt += 1
            next_tokens = logits.argmax(dim=-1)
            next_positions = next_positions + 1
            alive = alive & (next_tokens != self.eos_token_id)
            kept = kept + alive.long()
            new_tokens.append(next_tokens)
        return torch.stack(new_tokens, dim=1).cpu(), kept.cpu()

    # ------------------------------------------------------ static-cache path
    def _static_prompt(self, input_ids, attention_mask, position_ids, plan, max_new_tokens):
        """The prompt's latent passes on a static cache with room for the new
        tokens; the one-column passes go through the step decoding uses.
        Returns (logits over the prompt, filled embeddings, the decoder)."""
        steps = _StaticCacheSteps(self, attention_mask, input_ids.shape[1] + max_new_tokens)
        logits, inputs_embeds = self._fill_by_column(
            input_ids, position_ids, plan, lambda embeds, positions, *_: steps.columns(embeds, positions)
        )
        return logits, inputs_embeds, steps

    def _static_cache(self, batch, capacity):
        """A StaticCache for this shape, reused across calls (a compiled step
        is specialised to its tensors); the two most recent shapes are kept."""
        key = (batch, capacity, torch.is_autocast_enabled(self.embedding.weight.device.type))
        cache = self._static_caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=self.base_causallm.config, max_cache_len=capacity)
            while len(self._static_caches) >= 2:
                self._static_caches.popitem(last=False)
        else:
            cache.reset()
        self._static_caches[key] = cache
        return cache

    def _one_column_step(self, cache, embeds, positions, key_ok, slot):
        """One column (B, 1) at cache slot `slot` (a 0-d tensor, so that a
        compiled step serves every slot): (logits (B, vocab), fed-back hidden
        state (B, width))."""
        outputs = self.base_causallm(
            inputs_embeds=embeds, attention_mask=visible_keys(key_ok, slot.view(1)), position_ids=positions,
            **self._cache_argument(cache), use_cache=True, output_hidden_states=True,
        )
        return outputs.logits[:, -1], outputs.hidden_states[self.latent_layer][:, -1]

    def _idle_call(self, input_ids):
        """A model call whose result is unused: keeps collectives in step."""
        self.gen_forward_cnt += 1
        return self.base_causallm(inputs_embeds=self.embedding(input_ids))

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


def _fresh(tensor):
    """A copy with the default strides of its shape."""
    return torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)


class _GrowingCacheSteps:
    """Decoding on the prompt's DynamicCache, one new token per call, the
    attention mask growing by a column each time (the eager path)."""

    def __init__(self, coconut, attention_mask, cache):
        self.coconut, self.mask, self.cache = coconut, attention_mask, cache

    def __call__(self, tokens, positions):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        outputs = self.coconut.base_causallm(
            inputs_embeds=self.coconut.embedding(tokens[:, None]),
            attention_mask=self.mask,
            position_ids=positions[:, None],
            **self.coconut._cache_argument(self.cache),
            use_cache=True,
        )
        return outputs.logits[:, -1]


class _StaticCacheSteps:
    """Model calls on a StaticCache of fixed capacity (prompt width plus new
    tokens, rounded up so that batches share shapes): wider spans go through
    the model as they are, single columns through the Coconut's step, whose
    shapes never change. Which keys are real is fixed once per batch."""

    ROUND = 128

    def __init__(self, coconut, attention_mask, length):
        self.coconut = coconut
        batch, width = attention_mask.shape
        capacity = -(-length // self.ROUND) * self.ROUND
        self.cache = coconut._static_cache(batch, capacity)
        # new tokens are always real keys; the prompt's padding never is
        self.key_ok = nn.functional.pad(attention_mask.bool(), (0, capacity - width), value=True)
        self.slots = torch.arange(capacity, device=attention_mask.device)
        self.next_slot = 0
        self.cuda = attention_mask.device.type == "cuda"

    def columns(self, embeds, positions):
        """(logits (B, n, vocab), last column's fed-back hidden state)."""
        if embeds.shape[1] == 1:
            logits, hidden = self.one(embeds, positions)
            return logits[:, None], hidden
        start = self.next_slot
        self.next_slot += embeds.shape[1]
        outputs = self.coconut.base_causallm(
            inputs_embeds=embeds, attention_mask=attention_rows(self.key_ok, start, self.next_slot), position_ids=positions,
            **self.coconut._cache_argument(self.cache), use_cache=True, output_hidden_states=True,
        )
        return outputs.logits, outputs.hidden_states[self.coconut.latent_layer][:, -1]

    def one(self, embeds, positions):
        if self.cuda:  # a new CUDA-graph replay: earlier outputs were copied out
            torch.compiler.cudagraph_mark_step_begin()
        slot = self.slots[self.next_slot]
        self.next_slot += 1
        # fresh tensors: a compiled step is specialised to its inputs' strides,
        # and a latent column sliced from the prompt has the prompt's
        embeds, positions = _fresh(embeds), _fresh(positions)
        logits, hidden = self.coconut._step(self.cache, embeds, positions, self.key_ok, slot)
        # CUDA-graph outputs live in memory the next replay overwrites
        return logits.clone(), hidden.clone()

    def __call__(self, tokens, positions):
        return self.one(self.coconut.embedding(tokens[:, None]), positions[:, None])[0]
