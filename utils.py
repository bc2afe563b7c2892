"""Small helpers shared by the other modules: the run config (the user's
`Config` from `load_config`, as in the reference, and the frozen, typed
`RunConfig` that `resolve_config` makes of it for a run), seeding, the
user-error type, and main-process printing."""

import argparse
import difflib
import json
import os
import random
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import get_args

import yaml

FAST_PATHS = ("auto", "compiled", "static", "eager")
DATA_FORMATS = ("coconut", "gsm8k")
# what `latent_norm` (config key and Coconut keyword) may be: nothing, RMS
# rescaling to the embedding scale, a parameter-free layer norm
LATENT_NORMS = ("none", "rms", "layernorm")
SAMPLE_FIELDS = ("question", "answer", "steps")
# the method keys; at most one may be set
METHODS = ("coconut", "cot", "no_thoughts", "no_cot")


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). run.py prints it as
    one line, without a traceback, and exits non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: one line and exit status 2,
    like every other user mistake. The message ends with `usage_line`, or
    else points at --help."""

    def __init__(self, *args, usage_line=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.usage_line = usage_line

    def error(self, message):
        hint = f"usage: {self.usage_line}" if self.usage_line else f"see {self.prog} --help"
        raise UserError(f"command line: {message} ({hint})")


class Config(dict):
    """A dict whose keys are also attributes, as in the reference code."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


REQUIRED = object()  # CONFIG_KEYS' default for a key the user must give


def key(meaning, default=MISSING, note=""):
    """A RunConfig field: what it means, its default (none: the user must
    give it) and a note on the default. docs/config.md's key table shows
    these, row for row (tests/test_docs.py)."""
    return field(default=default, metadata={"meaning": meaning, "note": note})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The settings of a run, frozen and typed, as resolve_config makes them
    from the user's Config. The fields are the config keys, in the order of
    the key tables; the first block is the reference code's key set. A path
    given as the string None is None here."""

    project: str = key("wandb project", "coconut")
    save_path: str = key("folder holding one sub-folder per run name")
    name: str = key("run name; checkpoints go to `save_path/name`")
    only_eval: bool = key("evaluate `load_model_path` once, at the stage of epoch `resume`, and stop", False)
    coconut: bool = key("Coconut method: latent tokens fed with hidden states", False)
    cot: bool = key("chain-of-thought training: stage 0 every epoch, no markers", False)
    no_thoughts: bool = key("Coconut curriculum with no latent tokens (forces `c_thought: 0`, `coconut: False`)", False)
    no_cot: bool = key("question → answer: no steps, no thoughts, no markers", False)
    c_thought: int = key("continuous thoughts per replaced reasoning step (at least 1 with `coconut`)", 1)
    epochs_per_stage: int = key("epochs per curriculum stage; epoch `e` trains stage `e // epochs_per_stage`", 1)
    max_latent_stage: int = key("stages beyond this one remove all steps", 0)
    pad_latent_to_max: bool = key("beyond `max_latent_stage`, use `max_latent_stage` thought slots even for samples with fewer steps", False)
    save_only_improve: bool = key("save a checkpoint only when validation accuracy beats the best so far (else every epoch)", False)
    uniform_prob: float = key(
        "per sample and epoch, the chance of training at a stage drawn uniformly from `0 .. len(steps)`; not with `cot`, whose "
        "model has no rows for the latent tokens a drawn stage needs",
        0.0,
    )
    model_id: str = key("HuggingFace model id or local folder")
    load_model_path: str | None = key(
        "state dict to start from: a plain one into a Coconut run (how a CoT model starts Coconut), a Coconut one into a Coconut "
        "run; a Coconut one into a non-Coconut run is refused",
        None, note="required with `only_eval`",
    )
    seed: int = key("random seed; the training order of each epoch depends on seed and epoch only", 0)
    resume: int = key("first epoch to run; must be below `num_epochs`", 0)
    bf16: bool = key("cast the whole model to bfloat16 (the reference's pure-bf16 training)", False)
    train_path: str | None = key(
        "training data: a JSON file, a local dataset folder (`FOLDER[:SPLIT]`) or a hub dataset (`ID[:CONFIG]:SPLIT`); see "
        "[data.md](data.md)",
        None, note="required unless `only_eval`",
    )
    val_path: str = key("validation data, as `train_path`; generation gets 64 new tokens when the path contains `gsm`, else 128")
    reset_optimizer: bool = key("a fresh AdamW at the start of **every** epoch (as the reference does), not only at stage changes", False)
    batch_size_training: int = key("training batch per process (also for the validation loss)", 32)
    debug: bool = key("no wandb, no checkpoints, first 5000 training and 32 validation samples", False)
    gradient_accumulation_steps: int = key("batches per optimizer step; the loss is divided by it, and the last batch of an epoch always steps", 1)
    num_epochs: int = key("epochs in total")
    lr: float = key("AdamW learning rate, > 0 (`1e-4` without a dot is accepted)", 1e-4)
    weight_decay: float = key("AdamW weight decay", 0.01)
    # extensions (defaults give the reference behaviour)
    batch_size_eval: int = key("validation prompts generated together per process; any value gives the same outputs as 1", 1)
    save_every_steps: int = key("also save a mid-epoch checkpoint every this many optimizer steps (0: only at epoch ends)", 0)
    keep_last: int = key("keep only the newest this many checkpoints, plus the best (0: keep all)", 0)
    train_samples: int = key("train on the first this many samples of `train_path` (0: all; `debug` caps it at 5000)", 0)
    mixed_precision: bool = key("bf16 autocast with float32 weights and AdamW state (not with `bf16`)", False)
    # data sources (docs/data.md)
    data_columns: str = key(
        "where a source keeps the sample fields: `field=column` pairs, comma-separated, e.g. `question=problem,steps=rationale` "
        "(empty: the columns are `question`, `answer`, `steps`)",
        "",
    )
    data_format: str = key(
        "`coconut` (steps a list of strings) or `gsm8k` (steps and answer taken from a GSM8K worked solution in the `answer` "
        "column); see [data.md](data.md)",
        "coconut",
    )
    # speed (results equal the eager reference up to floating-point rounding)
    fast_path: str = key(
        "how latent passes and decoding run: `eager` (the reference path), `static` (decoding on a static KV cache, latent passes"
        " with a 4-D mask built once per batch and no host sync between them), `compiled` (`static` plus `torch.compile`: CUDA "
        "graphs for the one-column decoding step on a GPU; the training passes are compiled in single-process runs), `auto` "
        "(`compiled` on a GPU, `eager` on a CPU); results equal `eager` up to floating-point rounding (see [speed.md](speed.md))",
        "auto",
    )
    sync_every: int = key(
        "training reads its losses (to log them and check they are finite) every this many batches and before every save, not "
        "after every batch; the logged values are the same",
        50,
    )
    tf32: bool = key("TF32 matmuls on a GPU (faster, fewer exact digits); off keeps the reference's full float32", False)
    # file safety
    legacy_state_files: bool = key(
        "resume from a `.state` file written before 2026-12-05, which only a full unpickling reads (it can run code: use it only "
        "for files you trust); a warning line says when it is used",
        False,
    )
    # ablations (docs/behaviour.md section 9); the pause-token baseline is pause_as_thought + no_curriculum
    no_curriculum: bool = key(
        "Coconut only: every epoch trains and evaluates the final stage, `max_latent_stage + 1` (all steps replaced by "
        "`max_latent_stage` thought slots); not with `uniform_prob` or `max_latent_stage: 0`",
        False,
    )
    pause_as_thought: bool = key(
        "Coconut only: the same `<|latent|>` slots and curriculum, but each keeps its own embedding (no hidden state fed back, "
        "one forward pass); with `no_curriculum`, the pause-token baseline",
        False,
    )
    # latent feedback variants (Coconut only); applied in this order: layer, norm, projection
    latent_layer: int = key(
        "Coconut only: `hidden_states` index fed back (0: embedding output; -1: last layer after the final norm, the reference); "
        "checked against the model's depth",
        -1,
    )
    latent_norm: str = key(
        "Coconut only: `none`, `rms` (rescale each fed-back vector to the mean RMS of the input-embedding rows) or `layernorm` "
        "(layer norm without parameters)",
        "none",
    )
    latent_projection: bool = key(
        "Coconut only: learned `Linear(hidden, hidden)` on the fed-back vector, identity at init; adds `latent_projection.*` "
        "checkpoint keys, which a run without it refuses",
        False,
    )


    @property
    def method(self):
        """The training method: one of METHODS, or "none" when no method key is
        set (the reference then trains the Coconut layout on a plain model,
        its latent tokens ordinary tokens)."""
        return next((m for m in METHODS if getattr(self, m)), "none")

    @property
    def latent_tokens(self):
        """Whether sequences carry the three latent tokens (markers and
        thought slots) and the model has embedding rows for them; CoT,
        No-CoT and no_thoughts use plain text."""
        return self.method in ("coconut", "none")

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _user_key(spec):
    """(type, default, meaning) of a field as the user writes it: a path that
    may be absent is a str whose default is the string None."""
    kinds = [t for t in get_args(spec.type) if t is not type(None)] or [spec.type]
    default = REQUIRED if spec.default is MISSING else ("None" if spec.default is None else spec.default)
    return kinds[0], default, spec.metadata["meaning"]


# key: (type, default, meaning), from RunConfig. Types are checked at load;
# REQUIRED keys must be given.
CONFIG_KEYS = {spec.name: _user_key(spec) for spec in fields(RunConfig)}
# keys whose user value "None" means absent
OPTIONAL_PATHS = tuple(spec.name for spec in fields(RunConfig) if type(None) in get_args(spec.type))


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


def read_config(path, overrides=()):
    """Read a YAML run config, apply `key=value` overrides, check every key and
    type, and fill defaults. Returns the Config and, apart, what was asked
    for: the keys the file and the command line gave, in that order."""
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
    asked = {}
    for source, mapping in ((path, raw), ("command line", parse_overrides(overrides))):
        for key, value in mapping.items():
            _check_key(str(key), source)
            asked[key] = _typed(key, value, source)
    defaults = {key: default for key, (_, default, _) in CONFIG_KEYS.items() if default is not REQUIRED and key not in asked}
    config = Config(asked, **defaults)  # the user's keys first, as written
    asked_config(config, source=path)  # a missing required key, and the settings together
    return config, asked


def load_config(path, overrides=()):
    """The Config of a YAML run config and its overrides (see read_config):
    the user's view, as the reference's, with the string None for an absent
    path; resolve_config makes the RunConfig a run uses."""
    return read_config(path, overrides)[0]


def asked_config(config, source="config"):
    """What the user asked for, as a RunConfig, before set-up resolves
    anything: keys the Config lacks take their defaults, a path given as the
    string None is None, and the settings are checked together
    (check_config; errors name `source`)."""
    values = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    unknown = [k for k in values if k not in CONFIG_KEYS]
    missing = [k for k, spec in CONFIG_KEYS.items() if spec[1] is REQUIRED and k not in values]
    if unknown or missing:
        raise UserError(f"{source}: unknown key '{unknown[0]}'" if unknown else f"{source}: missing required key '{missing[0]}'")
    for key in OPTIONAL_PATHS:
        if values.get(key) == "None":
            values[key] = None
    asked = RunConfig(**values)
    check_config(asked, source)
    return asked


def resolve_config(config, resume=None, source="config"):
    """The one place where a user's Config becomes the frozen RunConfig a run
    uses: asked_config, then `no_thoughts` trains no thought slots
    (c_thought 0, coconut off; docs/behaviour.md section 7 step 5), and a
    preempted run continues from `resume` (a checkpoints.ResumePoint: its
    epoch becomes `resume`, its checkpoint `load_model_path`; step 1). A
    RunConfig, resolved already, passes through. The library reads only the
    RunConfig; a user's Config is updated with the same changes, as the
    reference's set-up updates its config."""
    if isinstance(config, RunConfig) and resume is None:
        return config
    asked = asked_config(config, source)
    changes = {}
    if asked.no_thoughts:
        changes.update(c_thought=0, coconut=False)
    if resume is not None:
        changes.update(resume=resume.epoch, load_model_path=resume.checkpoint)
    if isinstance(config, Config):
        # the reference's set-up changes its config in place: whoever holds
        # the user's Config sees these changes as there
        config.update(changes)
    return replace(asked, **changes)


def check_config(config, source):
    """Settings of a RunConfig that are each well typed but make no sense
    together."""
    methods = [m for m in METHODS if getattr(config, m)]
    if len(methods) > 1:
        raise UserError(f"{source}: keys {' and '.join(methods)} are both set; choose one method")
    if config.coconut and config.c_thought == 0:
        raise UserError(f"{source}: key 'c_thought' is 0 with coconut set: no continuous thoughts to train (use no_thoughts)")
    if config.only_eval and config.load_model_path is None:
        raise UserError(f"{source}: key 'load_model_path' must name a checkpoint when only_eval is set")
    if config.bf16 and config.mixed_precision:
        raise UserError(f"{source}: keys bf16 and mixed_precision are both set; choose one precision")
    for key in ("lr",):
        if getattr(config, key) <= 0:
            raise UserError(f"{source}: key '{key}' must be > 0")
    non_negative = ("c_thought", "epochs_per_stage", "max_latent_stage", "resume", "seed", "save_every_steps", "keep_last",
                    "train_samples", "weight_decay")
    for key in non_negative:
        if getattr(config, key) < 0:
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
        if getattr(config, key) < 1:
            raise UserError(f"{source}: key '{key}' must be >= 1")
    if config.resume >= config.num_epochs:
        raise UserError(f"{source}: key 'resume' ({config.resume}) must be below num_epochs ({config.num_epochs}): no epoch would run")
    if not 0.0 <= config.uniform_prob <= 1.0:
        raise UserError(f"{source}: key 'uniform_prob' must be between 0 and 1")
    if config.cot and config.uniform_prob > 0:
        # a drawn stage would put latent tokens into a model that has no rows for them
        raise UserError(f"{source}: keys cot and uniform_prob are both set; CoT trains stage 0 only, uniform_prob draws later stages")
    if not config.only_eval and config.train_path is None:
        raise UserError(f"{source}: key 'train_path' is required unless only_eval is set")
    check_ablations(config, source)


def check_ablations(config, source):
    """The ablation and latent-feedback keys: each changes a Coconut run, so
    any of them without `coconut` (or a feedback variant with nothing fed
    back) is a contradiction, not a silent no-op."""
    if config.latent_norm not in LATENT_NORMS:
        raise UserError(f"{source}: key 'latent_norm' must be one of {', '.join(LATENT_NORMS)}, got {config.latent_norm!r}")
    keys = ("no_curriculum", "pause_as_thought", "latent_projection", "latent_layer", "latent_norm")
    changed = [k for k in keys if getattr(config, k) != CONFIG_KEYS[k][1]]
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


def one_line(error):
    """An exception's message as one line for a UserError: its first line, or
    its type when it has no message."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def atomic_write(path, write, binary=False):
    """Write `path` whole or not at all: `write(file)` fills a temporary file
    beside it, renamed into place once complete (removed on an error). A
    reader, or a restart after SIGKILL, sees the old file or the whole new
    one, never half."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") if binary else open(temporary, "w", encoding="utf-8") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_json_atomic(data, out):
    """A data file (the project's JSON layout), written atomically; its
    folder is made if needed."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    atomic_write(out, lambda f: json.dump(data, f, indent=1, ensure_ascii=False))


def set_seed(seed):
    # imported here: the preprocessing scripts import this module without torch
    import numpy as np
    import torch

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
