"""Small helpers shared by the other modules: the typed run config (`Config`,
`load_config`), seeding, the user-error type, and main-process printing."""

import argparse
import difflib
import os
import random

import numpy as np
import torch
import yaml

FAST_PATHS = ("auto", "compiled", "static", "eager")
DATA_FORMATS = ("coconut", "gsm8k")
# what `latent_norm` (config key and Coconut keyword) may be: nothing, RMS
# rescaling to the embedding scale, a parameter-free layer norm
LATENT_NORMS = ("none", "rms", "layernorm")
SAMPLE_FIELDS = ("question", "answer", "steps")


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). run.py prints it as
    one line, without a traceback, and exits non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: one line and exit status 2,
    like every other user mistake. `usage` is shown in the message."""

    def __init__(self, *args, usage_line, **kwargs):
        super().__init__(*args, **kwargs)
        self.usage_line = usage_line

    def error(self, message):
        raise UserError(f"command line: {message} (usage: {self.usage_line})")


class Config(dict):
    """A dict whose keys are also attributes, as in the reference code."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


REQUIRED = object()

# key: (type, default, meaning). Types are checked at load; REQUIRED keys must
# be given. The first block is the reference code's key set.
CONFIG_KEYS = {
    "project": (str, "coconut", "wandb project"),
    "save_path": (str, REQUIRED, "folder holding one sub-folder per run name"),
    "name": (str, REQUIRED, "run name: checkpoints go to save_path/name"),
    "only_eval": (bool, False, "evaluate load_model_path once and stop"),
    "coconut": (bool, False, "train with continuous thoughts (the Coconut method)"),
    "cot": (bool, False, "train on full chain-of-thought text (stage 0 always)"),
    "no_thoughts": (bool, False, "Coconut curriculum without latent tokens (c_thought forced to 0)"),
    "no_cot": (bool, False, "train on question -> answer, no steps, no thoughts"),
    "c_thought": (int, 1, "continuous thoughts per replaced reasoning step"),
    "epochs_per_stage": (int, 1, "epochs spent in each curriculum stage"),
    "max_latent_stage": (int, 0, "last stage that replaces one more step; later stages replace all"),
    "pad_latent_to_max": (bool, False, "always use max_latent_stage thought slots once all steps are replaced"),
    "save_only_improve": (bool, False, "save a checkpoint only when validation accuracy improves"),
    "uniform_prob": (float, 0.0, "probability of training a sample at a uniformly drawn stage"),
    "model_id": (str, REQUIRED, "HuggingFace model id or local folder"),
    "load_model_path": (str, "None", "state-dict file to start from; None for none"),
    "seed": (int, 0, "random seed"),
    "resume": (int, 0, "first epoch to run (epochs before it are skipped)"),
    "bf16": (bool, False, "cast the model to bfloat16 (reference behaviour)"),
    "train_path": (str, "None", "training data: JSON file, Arrow/Parquet folder or hub ID:SPLIT (needed unless only_eval)"),
    "val_path": (str, REQUIRED, "validation data, as train_path"),
    "reset_optimizer": (bool, False, "new AdamW at the start of every epoch"),
    "batch_size_training": (int, 32, "training batch size per process"),
    "debug": (bool, False, "no wandb, no checkpoints, 5000 train / 32 validation samples"),
    "gradient_accumulation_steps": (int, 1, "batches per optimizer step"),
    "num_epochs": (int, REQUIRED, "epochs to train"),
    "lr": (float, 1e-4, "AdamW learning rate"),
    "weight_decay": (float, 0.01, "AdamW weight decay"),
    # extensions (defaults give the reference behaviour)
    "batch_size_eval": (int, 1, "validation prompts generated together per process (same results as 1)"),
    "save_every_steps": (int, 0, "also save a mid-epoch checkpoint every this many optimizer steps (0: never)"),
    "keep_last": (int, 0, "keep only the newest this many checkpoints, plus the best (0: keep all)"),
    "train_samples": (int, 0, "train on the first this many samples of train_path (0: all)"),
    "mixed_precision": (bool, False, "bf16 autocast with float32 weights and AdamW state"),
    # data sources (see README: Data)
    "data_columns": (str, "", "source columns holding question, answer, steps, as field=column pairs, e.g. question=problem"),
    "data_format": (str, "coconut", "coconut (steps: a list of strings) or gsm8k (steps and answer from a GSM8K worked solution)"),
    # speed (results equal the eager reference up to floating-point rounding)
    "fast_path": (str, "auto", "latent passes and decoding: auto, compiled, static or eager (see README)"),
    "sync_every": (int, 50, "batches between host syncs in training: loss logging and the non-finite check (and at every save)"),
    "tf32": (bool, False, "TF32 matmuls on a GPU (float32 weights, faster, less exact); the reference is full float32"),
    # file safety
    "legacy_state_files": (bool, False, "resume from .state files written before 2026-12-05 (read by full unpickling: trusted files only)"),
    # ablations (docs/behaviour.md section 9); the pause-token baseline is pause_as_thought + no_curriculum
    "no_curriculum": (bool, False, "Coconut trained and evaluated at the final stage (all steps replaced) from epoch 0"),
    "pause_as_thought": (bool, False, "Coconut layout and curriculum, but latent positions keep their own embedding"),
    # latent feedback variants (Coconut only); applied in this order: layer, norm, projection
    "latent_layer": (int, -1, "hidden_states index fed back to the next latent (-1: the last layer)"),
    "latent_norm": (str, "none", "normalisation of the fed-back vector: none, rms or layernorm"),
    "latent_projection": (bool, False, "learned linear map (identity at init) on the fed-back vector"),
}


def _typed(key, value, source):
    kind = CONFIG_KEYS[key][0]
    if key == "load_model_path" and value is None:
        return "None"
    if kind is float and isinstance(value, str):
        # PyYAML reads `1e-4` (no dot) as a string; accept what parses as a number
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    # YAML reads unquoted on/off/yes/no as booleans
    hint = " (quote it: YAML reads on, off, yes and no as booleans)" if kind is str and isinstance(value, bool) else ""
    raise UserError(f"{source}: key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}{hint}")


def _check_key(key, source):
    if key not in CONFIG_KEYS:
        near = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"{source}: unknown key '{key}'{hint}")


def parse_overrides(pairs):
    """`key=value` command-line words to a dict, values read as YAML."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UserError(f"command line: expected key=value, got '{pair}'")
        out[key] = yaml.safe_load(text) if text else ""
    return out


def load_config(path, overrides=()):
    """Read a YAML run config, apply `key=value` overrides, check every key and
    type, fill defaults, and return a Config."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} not valid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    values = {}
    for source, mapping in ((path, raw), ("command line", parse_overrides(overrides))):
        for key, value in mapping.items():
            _check_key(str(key), source)
            values[key] = _typed(key, value, source)
    for key, (_, default, _) in CONFIG_KEYS.items():
        if key not in values:
            if default is REQUIRED:
                raise UserError(f"{path}: missing required key '{key}'")
            values[key] = default
    config = Config(values)
    check_config(config, path)
    return config


def check_config(config, source):
    """Settings that are each well typed but make no sense together."""
    methods = [m for m in ("coconut", "cot", "no_thoughts", "no_cot") if config[m]]
    if len(methods) > 1:
        raise UserError(f"{source}: keys {' and '.join(methods)} are both set; choose one method")
    if config.coconut and config.c_thought == 0:
        raise UserError(f"{source}: key 'c_thought' is 0 with coconut set: no continuous thoughts to train (use no_thoughts)")
    if config.only_eval and config.load_model_path == "None":
        raise UserError(f"{source}: key 'load_model_path' must name a checkpoint when only_eval is set")
    if config.bf16 and config.mixed_precision:
        raise UserError(f"{source}: keys bf16 and mixed_precision are both set; choose one precision")
    for key in ("lr",):
        if config[key] <= 0:
            raise UserError(f"{source}: key '{key}' must be > 0")
    non_negative = ("c_thought", "epochs_per_stage", "max_latent_stage", "resume", "seed", "save_every_steps", "keep_last",
                    "train_samples", "weight_decay")
    for key in non_negative:
        if config[key] < 0:
            raise UserError(f"{source}: key '{key}' must be >= 0")
    if config.data_format not in DATA_FORMATS:
        raise UserError(f"{source}: key 'data_format' must be one of {', '.join(DATA_FORMATS)}, got {config.data_format!r}")
    try:
        parse_data_columns(config.data_columns)
    except ValueError as e:
        raise UserError(f"{source}: key 'data_columns': {e}") from None
    if config.fast_path not in FAST_PATHS:
        raise UserError(f"{source}: key 'fast_path' must be one of {', '.join(FAST_PATHS)}, got {config.fast_path!r}")
    for key in ("batch_size_training", "batch_size_eval", "gradient_accumulation_steps", "epochs_per_stage", "num_epochs", "sync_every"):
        if config[key] < 1:
            raise UserError(f"{source}: key '{key}' must be >= 1")
    if config.resume >= config.num_epochs:
        raise UserError(f"{source}: key 'resume' ({config.resume}) must be below num_epochs ({config.num_epochs}): no epoch would run")
    if not 0.0 <= config.uniform_prob <= 1.0:
        raise UserError(f"{source}: key 'uniform_prob' must be between 0 and 1")
    if config.cot and config.uniform_prob > 0:
        # a drawn stage would put latent tokens into a model that has no rows for them
        raise UserError(f"{source}: keys cot and uniform_prob are both set; CoT trains stage 0 only, uniform_prob draws later stages")
    if not config.only_eval and config.train_path == "None":
        raise UserError(f"{source}: key 'train_path' is required unless only_eval is set")
    check_ablations(config, source)


def check_ablations(config, source):
    """The ablation and latent-feedback keys: each changes a Coconut run, so
    any of them without `coconut` (or a feedback variant with nothing fed
    back) is a contradiction, not a silent no-op."""
    if config.latent_norm not in LATENT_NORMS:
        raise UserError(f"{source}: key 'latent_norm' must be one of {', '.join(LATENT_NORMS)}, got {config.latent_norm!r}")
    keys = ("no_curriculum", "pause_as_thought", "latent_projection", "latent_layer", "latent_norm")
    changed = [k for k in keys if config[k] != CONFIG_KEYS[k][1]]
    if changed and not config.coconut:
        raise UserError(f"{source}: key '{changed[0]}' needs coconut: True (it changes how continuous thoughts are trained)")
    feedback = [k for k in changed if k.startswith("latent_")]
    if config.pause_as_thought and feedback:
        raise UserError(f"{source}: keys pause_as_thought and {feedback[0]} are both set; pause_as_thought feeds no hidden state back")
    if config.no_curriculum and config.uniform_prob > 0:
        raise UserError(f"{source}: keys no_curriculum and uniform_prob are both set; uniform_prob draws earlier stages")
    if config.no_curriculum and config.max_latent_stage == 0:
        raise UserError(f"{source}: key 'max_latent_stage' is 0 with no_curriculum set: the final stage has no continuous thoughts")


def parse_data_columns(text):
    """`data_columns` ("question=problem,steps=rationale") as {field: column};
    ValueError names what is wrong."""
    renames = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        field, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not column:
            raise ValueError(f"expected field=column, got {pair!r}")
        if field not in SAMPLE_FIELDS:
            raise ValueError(f"{field!r} is not one of {', '.join(SAMPLE_FIELDS)}")
        if field in renames:
            raise ValueError(f"{field!r} is given twice")
        renames[field] = column
    return renames


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def run_folder(configs):
    return os.path.join(configs.save_path, configs.name)


def is_main_process():
    """Rank 0 of a torchrun launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)
