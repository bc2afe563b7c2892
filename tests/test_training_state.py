"""The run's TrainingState (what a checkpoint's .state records of where the
run stands) and SavePolicy (the one place that decides when to save).

python -m pytest -q tests/test_training_state.py
"""

import pytest
import torch
from helpers import config_for

import run as cli
from checkpoints import SavePolicy, TrainingState, read_state
from utils import Config


def test_state_dict_round_trip_and_older_files():
    state = TrainingState(epoch=3, batches_done=5, optimizer_steps=40, best_acc=0.5, best_name="checkpoint_2", wandb_id="abc")
    again = TrainingState()
    again.load_state_dict(state.state_dict())
    assert again == state
    older = {"epoch": 2, "batches_done": 0, "best_acc": 0.25, "best_name": "checkpoint_1", "wandb_id": "x", "rng": []}
    restored = TrainingState(optimizer_steps=7)
    restored.load_state_dict(older)  # a .state from before 2026-12-05: no optimizer_steps
    assert (restored.epoch, restored.best_acc, restored.optimizer_steps) == (2, 0.25, 7)


@pytest.mark.parametrize(
    "epoch, batches_done, name",
    [(1, 0, "checkpoint_1"), (3, 0, "checkpoint_3"), (0, 4, "partial_1_4"), (2, 1, "partial_3_1")],
)
def test_checkpoint_name_follows_the_position(epoch, batches_done, name):
    assert TrainingState(epoch=epoch, batches_done=batches_done).checkpoint_name() == name


def policy(**kw):
    return SavePolicy(Config(dict(debug=False, save_only_improve=False, save_every_steps=0), **kw))


def test_save_policy():
    assert policy().after_training() and not policy().after_evaluation(True)
    only_improve = policy(save_only_improve=True)
    assert not only_improve.after_training()
    assert only_improve.after_evaluation(True) and not only_improve.after_evaluation(False)
    debug = policy(debug=True, save_only_improve=True)
    assert not debug.enabled and not debug.after_training() and not debug.after_evaluation(True)
    every_two = Config(save_every_steps=2)
    assert [SavePolicy.mid_epoch(every_two, steps, last_batch=False) for steps in range(1, 6)] == [False, True, False, True, False]
    assert not SavePolicy.mid_epoch(every_two, 4, last_batch=True)  # the epoch-end save covers it
    assert not SavePolicy.mid_epoch(Config(save_every_steps=0), 4, last_batch=False)


@pytest.mark.slow
def test_a_run_records_its_optimizer_steps(workspace, tmp_path):
    """24 samples at batch 4 with 2 batches per step: 3 optimizer steps an
    epoch, counted across epochs and across a resume."""
    configs = config_for(workspace, tmp_path, "steps", num_epochs=2, batch_size_training=4, gradient_accumulation_steps=2)
    cli.run(configs, 0, 1, torch.device("cpu"))
    folder = tmp_path / "runs" / "steps"
    first, second = (read_state(str(folder / f"checkpoint_{i}")) for i in (1, 2))
    assert (first["epoch"], first["optimizer_steps"]) == (1, 3)
    assert (second["epoch"], second["optimizer_steps"]) == (2, 6)
    configs = config_for(workspace, tmp_path, "steps", num_epochs=3, batch_size_training=4, gradient_accumulation_steps=2)
    cli.run(configs, 0, 1, torch.device("cpu"))  # resumes from checkpoint_2
    assert read_state(str(folder / "checkpoint_3"))["optimizer_steps"] == 9
