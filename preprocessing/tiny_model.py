"""An offline tiny model: a byte-level BPE tokenizer trained on the given data
files and a randomly initialised GPT-2 of a chosen size, saved together to a
folder that a config's `model_id` can name (loaded by `from_pretrained`, as
any HuggingFace model). No network.

Usage: python preprocessing/tiny_model.py data/graph_train.json [more.json ...]
       [--out models/tiny-gpt2] [--n-layer 4] [--n-embd 128] [--n-head 4]
       [--n-positions 512] [--n-inner 4*n_embd] [--activation gelu_new]
       [--vocab-size 1000] [--dropout 0] [--seed 0]
"""

import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from utils import ArgumentParser, UserError  # noqa: E402

EOS = "<|endoftext|>"
ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu")


def corpus(samples):
    """The full text of every sample, as the model will see it."""
    from dataset import sample_text  # imported when used, as load_samples below

    for sample in samples:
        yield sample_text(sample)


def train_tokenizer(texts, vocab_size, split_digits=True, bos_token=None):
    """A GPT-2-style byte-level BPE trained on `texts`. Its only special token
    is eos, which stands in for bos and unk too, unless `bos_token` names a
    start token put before every encoding (as Llama's tokenizer does).
    `split_digits` splits numbers digit by digit, so they are read so."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, bos_token] if bos_token else [EOS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, tok.token_to_id(bos_token))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=bos_token or EOS, unk_token=EOS)


def build_model(tokenizer, n_layer, n_embd, n_head, n_positions, seed, dropout=0.0, n_inner=None, activation="gelu_new"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=eos, eos_token_id=eos, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        n_inner=n_inner, activation_function=activation,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def build(
    data_paths, out, n_layer=4, n_embd=128, n_head=4, n_positions=512, vocab_size=1000, seed=0, dropout=0.0,
    n_inner=None, activation="gelu_new",
):
    """Write tokenizer and model to `out` (replacing what was there, only once
    the new one is complete). Returns the model's parameter count."""
    from dataset import load_samples

    if n_embd % n_head:
        raise UserError(f"--n-embd ({n_embd}) must be a multiple of --n-head ({n_head})")
    texts = [t for path in data_paths for t in corpus(load_samples(path))]
    tokenizer = train_tokenizer(texts, vocab_size)
    longest = max(len(ids) for ids in tokenizer(texts[:2000])["input_ids"])
    if longest + 16 > n_positions:
        raise UserError(f"--n-positions ({n_positions}) is too small: samples reach {longest} tokens")
    model = build_model(
        tokenizer, n_layer, n_embd, n_head, n_positions, seed, dropout=dropout, n_inner=n_inner, activation=activation
    )
    temporary = out.rstrip("/") + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(temporary)
    model.save_pretrained(temporary)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(temporary, out)
    return sum(p.numel() for p in model.parameters()), len(tokenizer), longest


def main(argv=None):
    parser = ArgumentParser(description="Build a tiny GPT-2 and its tokenizer from data files, offline.")
    parser.add_argument("data", nargs="+", help="data files (project JSON format) to train the tokenizer on")
    parser.add_argument("--out", default="models/tiny-gpt2", help="folder to save into (a config's model_id)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-positions", type=int, default=512)
    parser.add_argument("--n-inner", type=int, default=None, help="width of the MLP (default 4 * --n-embd)")
    parser.add_argument("--activation", default="gelu_new", choices=ACTIVATIONS,
                        help="the MLP's activation (GPT-2's own is gelu_new; relu is the cheapest on a CPU)")
    parser.add_argument("--vocab-size", type=int, default=1000, help="upper bound; small corpora stop earlier")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="GPT-2's three dropout rates (0: a tiny model trained briefly learns faster without)")
    parser.add_argument("--seed", type=int, default=0)
    try:
        args = parser.parse_args(argv)
        for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner"):
            if getattr(args, key) is not None and getattr(args, key) < 1:
                parser.error(f"--{key.replace('_', '-')} must be >= 1")
        if not 0 <= args.dropout < 1:
            parser.error("--dropout must be in [0, 1)")
        # every option but the paths is one of build()'s keywords, under the same name
        options = {key: value for key, value in vars(args).items() if key not in ("data", "out")}
        params, vocab, longest = build(args.data, args.out, **options)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out}: cannot write ({e.strerror})", file=sys.stderr)
        return 2
    print(f"{args.out}: GPT-2 with {params / 1e6:.2f}M parameters, {vocab} tokens, longest sample {longest} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
