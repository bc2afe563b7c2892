"""The training CLI: `python run.py CONFIG.yaml [key=value ...]`, or under
`torchrun --nnodes N --nproc_per_node M run.py CONFIG.yaml`.

The entry point only: command line -> config -> process group -> the
reference set-up order (docs/behaviour.md section 7) -> for each epoch, one
stage of the curriculum trained, saved, its validation loss measured and its
answer accuracy evaluated -> teardown. The work is done by build (model,
tokens, optimizer), distributed (process group, wrapping), checkpoints,
train, evaluation and metrics (wandb and the metrics file).
"""

import sys

import torch.distributed as dist

import build
import checkpoints
import distributed
import evaluation
import metrics
import train
from dataset import MyCollator, data_options, get_cot_latent_dataset, get_question_latent_dataset, load_samples, stage_for_epoch, tokenise_samples
from utils import ArgumentParser, UserError, is_main_process, print0, read_config, resolve_config, set_seed


def load_data(configs):
    """Read and check the data sources before anything is built or written;
    returns the training samples (None with only_eval) and the validation
    samples."""
    with distributed.main_process_first():
        raw_val = load_samples(configs.val_path, **data_options(configs))
        raw_train = None if configs.only_eval else load_samples(configs.train_path, **data_options(configs))
    return raw_train, raw_val


def run(configs, rank, world, device, asked=None):
    """A run of the user's Config `configs` in this process; `asked`, the
    keys the user gave (default: all of `configs`), is saved as config.yaml."""
    set_seed(configs.seed)
    resume = checkpoints.find_resume_checkpoint(configs)
    asked = dict(asked if asked is not None else configs)
    configs = resolve_config(configs, resume)  # frozen from here on
    process = distributed.Process(rank, world, device)
    raw_train, raw_val = load_data(configs)
    model, tokenizer, ids = build.build_model(configs)
    parallel = distributed.wrap_model(model, configs, world, device)
    build.set_tf32(configs, device)
    decoder = build.set_up_fast_path(model, tokenizer, configs, device, world)
    start_id, end_id, latent_id = ids["<|start-latent|>"], ids["<|end-latent|>"], ids["<|latent|>"]

    with distributed.main_process_first():
        if not configs.only_eval:
            base_train = tokenise_samples(raw_train, configs.train_path, tokenizer, max_size=train.train_size(configs))
        base_valid = tokenise_samples(raw_val, configs.val_path, tokenizer, max_size=32 if configs.debug else 100000000)
    markerless = not configs.latent_tokens

    state = checkpoints.TrainingState(epoch=configs.resume, batches_done=resume.batches_done if resume else 0)
    policy = checkpoints.SavePolicy(configs)
    optimizer = None if configs.reset_optimizer else build.build_optimizer(parallel, configs)
    optimizer = checkpoints.restore(configs, parallel, optimizer, rank, state)
    checkpoints.save_run_config(asked, configs)
    logger = metrics.open_logger(configs, state)
    collator = MyCollator(tokenizer, latent_id=latent_id, label_pad_token_id=-100)

    def save(batches_done=0):
        state.batches_done = batches_done
        checkpoints.save_checkpoint(parallel, optimizer, configs, state)

    for epoch in range(configs.resume, configs.num_epochs):
        state.epoch = epoch
        stage = stage_for_epoch(configs, epoch)
        gen_set = get_question_latent_dataset(stage, base_valid, configs, start_id, latent_id, end_id, no_special_marker=markerless)
        if not configs.only_eval:
            # the order is drawn from (seed, epoch) alone, identical on every rank
            train_set = get_cot_latent_dataset(
                stage, base_train, configs, start_id, latent_id, end_id,
                no_special_marker=markerless, shuffle=True, seed=configs.seed * 100003 + epoch,
            )
            loss_set = get_cot_latent_dataset(stage, base_valid, configs, start_id, latent_id, end_id, no_special_marker=markerless)
            if configs.reset_optimizer and (state.batches_done == 0 or optimizer is None):
                optimizer = build.build_optimizer(parallel, configs)
            batches = train.epoch_batches(train_set, configs, collator, process, batches_done=state.batches_done)
            per_epoch = train.train_epoch(parallel, optimizer, batches, configs, stage=stage, device=device, logger=logger,
                                          tokenizer=tokenizer, state=state, save=save if policy.enabled else None)
            state.epoch, state.batches_done = epoch + 1, 0
            if policy.after_training():
                save()
            val_loss = train.validation_loss(parallel, train.epoch_batches(loss_set, configs, collator, process), configs, process)
            print0(f"eval loss {val_loss}")
            logger.log({"eval/loss": val_loss}, stage, epoch + 1, (epoch + 1) * per_epoch)

        with build.precision(configs, device):
            acc, cot_em = evaluation.evaluate(parallel, gen_set, raw_val, configs, tokenizer=tokenizer, collator=collator,
                                              process=process, generator=decoder)
        steps_done = 0 if configs.only_eval else (epoch + 1) * per_epoch
        logger.log({"eval/acc": acc, "eval/cot_em": cot_em}, stage, epoch + 1, steps_done)
        if configs.only_eval:
            break
        improved = acc > state.best_acc
        if improved:
            state.best_acc, state.best_name = acc, state.checkpoint_name()  # the one saved after this epoch
        if policy.after_evaluation(improved):
            save()
    metrics.print_stage_summary(logger)
    logger.close()
    # every rank reaches the process group's teardown together: a rank that
    # tears gloo down while another is still finishing can abort at exit
    distributed.barrier()


def parse_args(argv):
    parser = ArgumentParser(description="Train or evaluate a Coconut model.", usage_line="run.py CONFIG.yaml [key=value ...]")
    parser.add_argument("config_file", help="YAML run config (see args/)")
    parser.add_argument("overrides", nargs="*", help="key=value pairs that override the config")
    return parser.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        configs, asked = read_config(args.config_file, args.overrides)
        rank, world, device = distributed.init_distributed()
        print0("Config:", dict(configs))
        run(configs, rank, world, device, asked)
    except UserError as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except train.NonFiniteLoss as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
