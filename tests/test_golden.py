"""Golden losses: a short deterministic training run of run.py (the tiny
GPT-2 and data of the `workspace` fixture, two epochs, Coconut up to stage
1) gives the per-batch training losses, validation losses and accuracies
stored in tests/golden/tiny_run.json. Any change to what a run computes
(data layout, forward pass, optimizer, seeding, loss) shows here.

python -m pytest -q tests/test_golden.py
"""

import json
import os

import pytest
import torch
from helpers import config_for

import metrics
import run

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "tiny_run.json")
UPDATE = "COCONUT_UPDATE_GOLDEN"
# the run: 24 training samples in batches of 4, six batches an epoch; stage 0
# then stage 1 (one continuous thought); debug: no wandb, no checkpoints
SETTINGS = dict(num_epochs=2, max_latent_stage=1, c_thought=1, batch_size_training=4, batch_size_eval=5, lr=1e-3, seed=0,
                reset_optimizer=False, debug=True)
HINT = (f"if the change is intended, regenerate {os.path.relpath(GOLDEN)} with "
        f"{UPDATE}=1 python -m pytest -q tests/test_golden.py and commit it")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(workspace, folder):
    """{"train/loss": [per batch], "eval/loss": [per epoch], "eval/acc": [per
    epoch]}, read from the metrics file of a fresh run in `folder`."""
    configs = config_for(workspace, folder, "golden", **SETTINGS)
    run.run(configs, 0, 1, torch.device("cpu"))
    records = metrics.read(folder / "runs" / "golden" / metrics.TRAIN_FILE)
    return {key: [r[key] for r in records if key in r] for key in ("train/loss", "eval/loss", "eval/acc")}


def test_tiny_run_matches_the_golden_losses(workspace, tmp_path):
    """Losses to rtol 1e-4 / atol 1e-5 (room for another CPU's rounding),
    accuracies exactly. With the environment variable
    COCONUT_UPDATE_GOLDEN=1 the test rewrites tests/golden/tiny_run.json
    from this run instead of comparing (and reports itself skipped)."""
    got = tiny_run(workspace, tmp_path)
    assert len(got["train/loss"]) == 12 and len(got["eval/loss"]) == len(got["eval/acc"]) == 2
    if os.environ.get(UPDATE) == "1":
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        about = "per-batch training losses, validation loss and accuracy per epoch; written by tests/test_golden.py"
        record = {"about": about, "settings": SETTINGS, "torch": torch.__version__, **got}
        with open(GOLDEN, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")
        pytest.skip(f"{UPDATE}=1: rewrote {GOLDEN} instead of comparing")

    assert os.path.exists(GOLDEN), f"no golden file: {HINT}"
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert golden["settings"] == SETTINGS, f"the golden file was made with other settings: {HINT}"
    for key in ("train/loss", "eval/loss"):
        assert len(got[key]) == len(golden[key]), f"{key}: {len(got[key])} values, the golden file holds {len(golden[key])}; {HINT}"
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64), torch.tensor(golden[key], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5, msg=lambda message, key=key: f"{key} differs from the golden run: {message}\n{HINT}")
    assert got["eval/acc"] == golden["eval/acc"], f"eval/acc {got['eval/acc']} != golden {golden['eval/acc']}; {HINT}"
