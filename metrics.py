"""Where a run's metrics go: wandb (Logger) and the local metrics log,
`metrics.jsonl` in the run folder, one JSON object a line, written by the
main process beside (not instead of) wandb; and the plots drawn from it.

Every line holds the keys logged to wandb at that moment (`train/loss`,
`eval/acc`, ...) plus `stage`, `epoch` (from 1), `step` (training batches
since the run began, as `train/step`) and `wall_time` (seconds of this run,
summed over restarts; for a training line, when its batch ran, though the
line is written at the next sync point, every `sync_every` batches).
Training lines also hold `batch` (index in the epoch). A restarted run first
drops the lines past the point it resumes from, so the file always describes
one uninterrupted history. Evaluation-only runs append to
`eval_metrics.jsonl` instead, never touching the training history.
"""

import copy
import json
import os
import sys
import time

from utils import ArgumentParser, UserError, atomic_write, is_main_process, print0, run_folder

TRAIN_FILE = "metrics.jsonl"
EVAL_ONLY_FILE = "eval_metrics.jsonl"


def read(path):
    """The records of a metrics file, in order; a torn last line (a run killed
    while writing) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def before(record, epoch, batch):
    """Whether a record was logged before 0-based `epoch`, batch `batch`."""
    if record["epoch"] - 1 != epoch:
        return record["epoch"] - 1 < epoch
    return "batch" in record and record["batch"] < batch


class MetricsLog:
    """Appends records to the run's metrics file. `start` = (0-based epoch,
    batches done) where this run begins; earlier records are kept, later
    ones (from a run that was cut off) are dropped."""

    def __init__(self, folder, start=(0, 0), only_eval=False):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, EVAL_ONLY_FILE if only_eval else TRAIN_FILE)
        kept = []
        if os.path.exists(self.path) and not only_eval:
            kept = [r for r in read(self.path) if before(r, *start)]
            atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
        self.offset = kept[-1]["wall_time"] if kept else 0.0
        self.started = time.monotonic()
        self.file = open(self.path, "a")

    def log(self, values, stage, epoch, step, when=None, **extra):
        """`when`: the time.monotonic() reading the record belongs to, if not now
        (training losses are read in groups, after their batches ran)."""
        record = dict(values, stage=stage, epoch=epoch, step=step, **extra)
        record["wall_time"] = round(self.offset + (time.monotonic() if when is None else when) - self.started, 3)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a run may be killed at any moment

    def close(self):
        self.file.close()


def accuracy_by_stage(records):
    """[(stage, epoch, eval/acc)] for the last evaluated epoch of each stage,
    in stage order."""
    last = {}
    for r in records:
        if "eval/acc" in r:
            last[r["stage"]] = (r["stage"], r["epoch"], r["eval/acc"])
    return [last[s] for s in sorted(last)]


# -------------------------------------------------------------------- plots
def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def per_epoch(records):
    """{epoch: {"stage", "train/loss" (mean over the epoch's batches),
    "eval/loss", "eval/acc", "eval/cot_em"}} from a training metrics file."""
    epochs, train_sums = {}, {}
    for r in records:
        row = epochs.setdefault(r["epoch"], {})
        row["stage"] = r["stage"]
        if "train/loss" in r:
            total, count = train_sums.get(r["epoch"], (0.0, 0))
            train_sums[r["epoch"]] = (total + r["train/loss"], count + 1)
        for key in ("eval/loss", "eval/acc", "eval/cot_em"):
            if key in r:
                row[key] = r[key]
    for epoch, (total, count) in train_sums.items():
        epochs[epoch]["train/loss"] = total / count
    return dict(sorted(epochs.items()))


def stage_starts(epochs):
    """[(first epoch, stage)] for every stage, in order."""
    starts, previous = [], None
    for epoch, row in epochs.items():
        if row["stage"] != previous:
            starts.append((epoch, row["stage"]))
            previous = row["stage"]
    return starts


def series(epochs, key):
    points = [(e, row[key]) for e, row in epochs.items() if key in row]
    return [e for e, _ in points], [v for _, v in points]


def plot_curves(epochs, path, title):
    """Train and validation loss (top) and validation accuracy and CoT match
    (bottom) over epochs, a dashed line where each stage begins."""
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for key, label in (("train/loss", "train loss"), ("eval/loss", "validation loss")):
        loss_ax.plot(*series(epochs, key), marker="o", label=label)
    for key, label in (("eval/acc", "validation accuracy"), ("eval/cot_em", "CoT match")):
        acc_ax.plot(*series(epochs, key), marker="o", label=label)
    for epoch, stage in stage_starts(epochs):
        for ax in (loss_ax, acc_ax):
            ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=0.8)
        acc_ax.text(epoch - 0.4, 1.02, f"stage {stage}", fontsize=8, color="grey")
    loss_ax.set_ylabel("loss")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.1)
    acc_ax.set_xlabel("epoch")
    loss_ax.set_title(title)
    for ax in (loss_ax, acc_ax):
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_stage_accuracy(rows, path, title):
    """A bar per stage: validation accuracy at that stage's last epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"stage {stage}" for stage, _, _ in rows]
    values = [acc for _, _, acc in rows]
    bars = ax.bar(labels, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    save_figure(fig, path)


def plot(folder, out=None):
    """Render `curves.png` and `stage_accuracy.png` from the metrics file of
    the run in `folder` (into `out`, default the same folder). Returns the
    paths written."""
    path = os.path.join(folder, TRAIN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no metrics file (give a run folder: <save_path>/<name>)")
    records = [r for r in read(path) if isinstance(r, dict) and "epoch" in r and "stage" in r]
    if not records:
        raise ValueError(f"{path}: holds no metrics records")
    epochs = per_epoch(records)
    rows = accuracy_by_stage(records)
    out = out or folder
    os.makedirs(out, exist_ok=True)
    title = os.path.basename(os.path.normpath(folder))
    written = [os.path.join(out, "curves.png")]
    plot_curves(epochs, written[0], title)
    if rows:
        written.append(os.path.join(out, "stage_accuracy.png"))
        plot_stage_accuracy(rows, written[1], title)
    return written


# ------------------------------------------------------- the run's Logger
def init_wandb(configs, run_id=None):
    """Online with a login; otherwise offline, saying so in one line. A
    resumed run continues the wandb run `run_id`."""
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not has_wandb_login():
        mode = "offline"
        print0("wandb: no login found, logging offline (run `wandb login` or set WANDB_API_KEY to log online)")
    try:
        run = wandb.init(
            project=configs.project, name=configs.name, mode=mode, config=run_record(configs), id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as e:  # no network, bad key: the training must go on
        print0(f"wandb: could not start ({type(e).__name__}); logging offline")
        run = wandb.init(project=configs.project, name=configs.name, mode="offline", config=run_record(configs), id=run_id)
    return run


def run_record(configs):
    """What wandb records of the RunConfig: every key, and the method."""
    return {**configs.to_dict(), "method": configs.method}


def has_wandb_login():
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def log_batch_table(run, table, batch, tokenizer, step):
    """One table row per epoch: every position's id, label and token."""
    lines = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        lines += [f"{i} {label} {tokenizer.decode([i])}" for i, label in zip(ids, labels)]
        lines.append("=" * 40)
    table.add_data(step, "\n".join(lines) + "\n")
    run.log({"data_table": copy.copy(table)})


class Logger:
    """Where metrics go: wandb (main process, not in debug or only_eval runs)
    and the run's metrics file (main process). Other ranks get one that drops
    everything."""

    def __init__(self, wandb_run=None, metrics_log=None):
        self.wandb_run, self.metrics_log = wandb_run, metrics_log
        self.table = None
        if wandb_run is not None:
            import wandb

            self.table = wandb.Table(columns=["step", "text"])

    def log(self, values, stage, epoch, step, when=None, **extra):
        if self.wandb_run is not None:
            self.wandb_run.log(values)
        if self.metrics_log is not None:
            self.metrics_log.log(values, stage, epoch, step, when=when, **extra)

    def batch_table(self, batch, tokenizer, step):
        if self.wandb_run is not None:
            log_batch_table(self.wandb_run, self.table, batch, tokenizer, step)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.metrics_log is not None:
            self.metrics_log.close()


def open_logger(configs, state):
    """The main process's Logger; a resumed run continues its wandb run
    (recorded in the TrainingState `state`) and its metrics file from the
    point it resumes at."""
    if not is_main_process():
        return Logger()
    wandb_run = None
    if not configs.debug and not configs.only_eval:
        wandb_run = init_wandb(configs, state.wandb_id)
        state.wandb_id = wandb_run.id
    start = (state.epoch, state.batches_done)
    return Logger(wandb_run, MetricsLog(run_folder(configs), start, only_eval=configs.only_eval))


def print_stage_summary(logger):
    """Validation accuracy at the last epoch of every stage, from the run's
    whole metrics history (earlier sessions of a resumed run included)."""
    if logger.metrics_log is None:
        return
    rows = accuracy_by_stage(read(logger.metrics_log.path))
    if rows:
        print("Accuracy by stage (last epoch of each):", flush=True)
        for stage, epoch, acc in rows:
            print(f"  stage {stage} (epoch {epoch}): {acc:.4f}", flush=True)



def main(argv=None):
    parser = ArgumentParser(description="Plot a run's metrics: loss and accuracy over epochs, accuracy per stage.")
    parser.add_argument("run_folder", help="the run's folder, <save_path>/<name>, holding metrics.jsonl")
    parser.add_argument("--out", help="folder for the PNGs (default: the run folder)")
    try:
        args = parser.parse_args(argv)
        written = plot(args.run_folder, args.out)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
