"""What a run computes with: the pretrained model and tokenizer with the
three latent tokens (set-up steps 2 to 7 of docs/behaviour.md section 7),
the Coconut wrapper, the optimizer, and how the model computes (precision,
TF32, the fast path)."""

import os
from contextlib import nullcontext

import torch

from coconut import FEEDBACK_OPTIONS, Coconut, fast_path_unsupported
from utils import UserError, one_line, print0, resolve_config

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def load_pretrained(model_id):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        # float32 as in the reference (transformers 5 would otherwise load the
        # checkpoint's dtype, bfloat16 for Llama 3.2 and Qwen2.5); `bf16` and
        # `mixed_precision` choose lower precision explicitly
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"model_id '{model_id}': cannot load model or tokenizer ({one_line(e)})") from None
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
        raise UserError(f"load_model_path '{path}': weights do not fit the model ({one_line(e)})") from None
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
    """Steps 2 to 7 of the set-up order for a RunConfig (a user's Config is
    resolved first). Returns (model, tokenizer, token ids)."""
    configs = resolve_config(configs)
    saved = read_state_dict(configs.load_model_path) if configs.load_model_path is not None else None
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

    if configs.latent_tokens:
        init_latent_embeddings(model, tokenizer)
    if configs.coconut:  # step 5 (no_thoughts) was done by resolve_config
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
            **{key: getattr(configs, key) for key in FEEDBACK_OPTIONS},
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


def plain_model(model):
    return model.base_causallm if isinstance(model, Coconut) else model


def build_optimizer(parallel, configs):
    return torch.optim.AdamW(parallel.parameters(), lr=configs.lr, weight_decay=configs.weight_decay)



# --------------------------------------------------------- how it computes
def precision(configs, device):
    """bf16 autocast for `mixed_precision` (weights and AdamW state stay
    float32); nothing otherwise."""
    if configs.mixed_precision:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


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


def decoder_for(model, tokenizer):
    """The model's Coconut; a plain LM decodes through the same greedy loop
    (no latents to fill)."""
    return model if isinstance(model, Coconut) else Coconut(model, *(-1,) * 3, tokenizer.eos_token_id)


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

