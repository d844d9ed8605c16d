"""TensorBoard summaries of a run folder, on one step axis: optimizer iterations.

A run folder's `logs/` holds four TensorBoard runs (replays count as
iterations, so free training's m replays of a batch are m steps):

- `logs/` itself: the HParams session (`write_run_header`: method, m, ε, step
  sizes, model, data, batch, schedule, weight decay, seed, strategy), text
  summaries of the full config and of the command line, and the final results
  that are the session's metrics (`write_results`): `final/clean_accuracy`,
  `final/pgd20_accuracy` and `final/train_minutes` at the end of training,
  `evaluation/<attack>_accuracy` from `tf_free.evaluate` (or
  `scripts/reproduce_fashion_mnist.py`), e.g. `evaluation/autoattack_accuracy`;
- `logs/train`: `TrainingSummaries`, every `log_every` iterations, from the
  step's own outputs (no extra forward pass): `train/adv_loss` and
  `train/adv_accuracy` (on x+δ or x_adv; `train/loss`, `train/accuracy` for
  natural training), `train/learning_rate`, δ statistics for free training,
  `time/train_minutes` and `time/iterations_per_second`;
- `logs/robustness`: `tf_free.callbacks.RobustnessEvaluation` (clean and
  PGD-K / APGD-CE accuracy, `time/eval_minutes`, adversarial images).

Group names sort "evaluation", "final", "robustness", "time", "train", "x_adv"
in TensorBoard, so accuracies come before curves and the image cards come last.

A resumed run first cuts every series back to the checkpoint's iteration
(`truncate_after`), so no point is written twice.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp_summary

from tf_free import loop

# Tags of the final metrics shown as HParams columns; (group = run under logs/, tag, title).
ROBUSTNESS_RUN = "robustness"
TRAIN_RUN = "train"


def evaluation_tag(attack: str) -> str:
    """`evaluation/pgd20_accuracy` for the attack named "pgd20" (`apgd-ce` → `apgd_ce`)."""
    return f"evaluation/{attack.replace('-', '_')}_accuracy"


# --- Training curves -----------------------------------------------------------------


class TrainingSummaries(loop.CallCallback):
    """Training scalars every `log_every` optimizer iterations, to `<log_dir>/train`.

    Written in `on_train_batch_end` from the logs the step already returns: a
    point is written after the batch at which the iteration count reaches a
    multiple of `log_every` (a batch of free training is m iterations, so with
    `log_every` < m some multiples share a batch). Scalars, with the iteration
    as step:

    - `train/<name>` for each metric of the step (`adv_loss`, `adv_accuracy`):
      the mean over the batches since the previous point (Keras's metrics are
      means since the pass began; the window mean is taken from two of them);
    - `train/learning_rate`: the learning rate of the point's last iteration;
    - with `perturbation` (free training's δ, a variable or per-replica
      variable): `train/delta_mean_abs_over_epsilon` (mean |δ|/ε, in [0, 1]),
      `train/delta_fraction_at_epsilon` (the fraction of δ's entries at ±ε),
      and every `histogram_every` points the histogram `train/delta_over_epsilon`;
    - `time/train_minutes`: training time so far, without evaluation (the
      number `results.json` gives at the end), and `time/iterations_per_second`
      over the window.

    The training time is `params["train_state"].train_seconds()` (set by
    `tf_free.loop.fit`), else the wall time since `on_train_begin`.
    """

    def __init__(
        self,
        log_dir: str,
        *,
        log_every: int,
        epsilon: float = 0.0,
        perturbation=None,
        histogram_every: int = 10,
    ):
        super().__init__()
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.log_every = log_every
        self.epsilon = epsilon
        self.perturbation = perturbation
        self.histogram_every = histogram_every
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, TRAIN_RUN))
        self._points = 0

    def train_seconds(self) -> float:
        state = self.params.get("train_state") if self.params else None
        return state.train_seconds() if state is not None else time.time() - self._began

    def on_train_begin(self, logs=None):
        self._began = time.time()
        self._last_iteration = loop.iterations(self.model)
        self._last_seconds = self.train_seconds()

    def on_epoch_begin(self, epoch, logs=None):
        self._batches = 0  # since the metrics were reset
        self._window = {}  # name -> (batches, running mean) at the last point

    def on_train_batch_end(self, batch, logs=None):
        self._batches += self._batches_in_call(batch)
        iteration = loop.iterations(self.model)
        if not loop.reached_multiple(self._last_iteration, iteration, self.log_every):
            return
        seconds = self.train_seconds()
        with self.writer.as_default(step=iteration):
            for name, mean in (logs or {}).items():
                before, mean_before = self._window.get(name, (0, 0.0))
                window = (mean * self._batches - mean_before * before) / (self._batches - before)
                self._window[name] = (self._batches, mean)
                tf.summary.scalar(f"train/{name}", window, description=_TRAIN_HELP.get(name))
            tf.summary.scalar(
                "train/learning_rate",
                _learning_rate(self.model.optimizer, iteration - 1),
                description="The learning rate of the optimizer's last iteration.",
            )
            if self.perturbation is not None and self.epsilon > 0:
                self._write_delta()
            tf.summary.scalar(
                "time/train_minutes",
                seconds / 60,
                description="Training time so far, without evaluation (results.json's "
                "train_minutes at the end).",
            )
            elapsed = seconds - self._last_seconds
            if elapsed > 0:
                tf.summary.scalar(
                    "time/iterations_per_second",
                    (iteration - self._last_iteration) / elapsed,
                    description="Optimizer iterations (replays count) per second of training "
                    "since the previous point.",
                )
        # On disk at once: a run killed after its next checkpoint loses no point
        # (and the points after the checkpoint are cut on resume, then rewritten).
        self.writer.flush()
        self._points += 1
        self._last_iteration, self._last_seconds = iteration, seconds

    def on_train_end(self, logs=None):
        self.writer.flush()

    def _write_delta(self):
        """δ statistics of this worker's replicas, in units of ε."""
        variable = self.perturbation
        # Under a MirroredStrategy, δ is one variable per local replica.
        local = (
            variable.values if isinstance(variable, tf.distribute.DistributedValues) else [variable]
        )
        ratio = np.abs(np.concatenate([np.asarray(v).ravel() for v in local])) / self.epsilon
        tf.summary.scalar(
            "train/delta_mean_abs_over_epsilon",
            float(ratio.mean()),
            description="δ (free training's, or fast training's last FGSM δ): mean |δ|/ε over its entries (1: every entry at ±ε).",
        )
        tf.summary.scalar(
            "train/delta_fraction_at_epsilon",
            float(np.mean(ratio >= 1 - 1e-4)),
            description="δ (free training's, or fast training's last FGSM δ): the fraction of its entries at ±ε.",
        )
        if self._points % self.histogram_every == 0:
            signed = np.concatenate([np.asarray(v).ravel() for v in local]) / self.epsilon
            tf.summary.histogram(
                "train/delta_over_epsilon",
                signed,
                description="δ/ε (free or fast training), in [-1, 1].",
            )


_TRAIN_HELP = {
    "adv_loss": "Training loss on the adversarial input (x+δ for free training, the PGD "
    "example for PGD training), mean over the iterations since the previous point.",
    "adv_accuracy": "Training accuracy on the adversarial input (x+δ for free training, the "
    "PGD example for PGD training), mean over the batches since the previous point.",
    "loss": "Training loss (natural training), mean since the previous point.",
    "accuracy": "Training accuracy (natural training), mean since the previous point.",
}


def _learning_rate(optimizer, iteration: int) -> float:
    rate = optimizer._learning_rate  # the schedule, or a variable for a constant rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(keras.ops.convert_to_numpy(rate(max(iteration, 0))))
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


# --- The run's header: HParams and text ------------------------------------------------


def hparams_of(config) -> dict:
    """The HParams of a run (a `TrainConfig`), in the units people quote: ε in 0-255."""
    values = {
        "method": config.method,
        "epsilon_255": float(config.epsilon),
        "model": config.model,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "epochs": float(config.epochs),
        "lr_schedule": config.lr_schedule,
        "lr": float(config.lr),
        "weight_decay": float(config.weight_decay),
        "seed": config.seed,
        "strategy": config.strategy,
    }
    if config.method == "free":
        values["m"] = config.m
        values["step_size_255"] = float(config.free_step_size)
    if config.method == "pgd":
        values["pgd_steps"] = config.pgd_steps
        values["step_size_255"] = float(config.pgd_training_step_size)
    if config.method == "fast":
        values["step_size_255"] = float(config.fast_training_step_size)
        values["fast_init"] = config.fast_init
    return values


def metrics_of(config) -> list[hp.Metric]:
    """The HParams table's metric columns: scalars of the session's own run (`logs/`).

    In the session's own run (group ""), because TensorBoard finds a metric in
    the run `<session>/<group>` by plain string joining, which for a session at
    the root of `--logdir` ("." + "/robustness") names no run.
    """
    attack = f"{config.eval_attack.replace('-', '_')}{config.eval_pgd_steps}"
    label = f"{'PGD' if config.eval_attack == 'pgd' else 'APGD-CE'}-{config.eval_pgd_steps}"
    return [
        hp.Metric("final/clean_accuracy", display_name="clean (end of training)"),
        hp.Metric(f"final/{attack}_accuracy", display_name=f"{label} (end of training)"),
        hp.Metric(evaluation_tag("natural"), display_name="clean (evaluate)"),
        hp.Metric(evaluation_tag("pgd20"), display_name="PGD-20 (evaluate)"),
        hp.Metric(evaluation_tag("autoattack"), display_name="AutoAttack (evaluate)"),
        hp.Metric("final/train_minutes", display_name="train minutes"),
    ]


# The HParams columns shown first: TensorBoard lists hparams marked `differs`
# first, then by name, and ticks the first five (tensorboard/plugins/hparams/
# backend_context.py, `_sort_and_reduce_to_hparams_limit`); a written config
# marks none, which would sort batch_size and dataset first.
KEY_HPARAMS = ("method", "m", "pgd_steps", "epsilon_255", "step_size_255")


def _write_hparams_config(names: list[str], metrics: list[hp.Metric]) -> None:
    """`hp.hparams_config`, with the `KEY_HPARAMS` marked to sort first."""
    names = list(dict.fromkeys(names))
    summary = hp_summary.hparams_config_pb([hp.HParam(n) for n in names], metrics)
    value = summary.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in KEY_HPARAMS
    value.metadata.plugin_data.content = data.SerializeToString()
    tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)


def _files(log_dir: str, kind: str) -> list[str]:
    """The event files of one kind ("header" or "results") directly in `log_dir`."""
    return glob.glob(os.path.join(log_dir, f"events.out.tfevents.*.{kind}"))


def has_header(log_dir: str) -> bool:
    return bool(_files(log_dir, "header"))


def write_run_header(config, log_dir: str, *, command: list[str] | str | None = None) -> None:
    """The HParams session and the text summaries `config` and `command` in `log_dir`.

    Replaces the header file in `log_dir` (its name ends in `.header`), so
    writing it again leaves one session.
    """
    for path in _files(log_dir, "header"):
        os.remove(path)
    writer = tf.summary.create_file_writer(log_dir, filename_suffix=".header")
    settings = json.loads(config.to_json())
    with writer.as_default(step=0):
        # Every method's hparams, so the first session TensorBoard finds lists them all.
        _write_hparams_config([*hparams_of(config), *KEY_HPARAMS], metrics_of(config))
        hp.hparams(
            hparams_of(config), trial_id=os.path.basename(os.path.normpath(config.model_dir))
        )
        table = "| setting | value |\n|---|---|\n" + "\n".join(
            f"| {key} | `{json.dumps(value)}` |" for key, value in settings.items()
        )
        tf.summary.text("config", table, description="The run's full config.json.")
        argv = sys.argv if command is None else command
        if not isinstance(argv, str):
            argv = " ".join(shlex.quote(a) for a in argv)
        tf.summary.text(
            "command",
            "```\n" + argv + "\n```",
            description="The command line that started this run (the latest, if resumed).",
        )
    writer.close()


# --- Final evaluation -----------------------------------------------------------------


def write_results(log_dir: str, results: dict[str, tuple[float, str]], step: int) -> None:
    """Final results as scalars of the run folder's own run (`logs/`): the HParams metrics.

    `results`: tag -> (value, description), e.g. `final/clean_accuracy` (the
    end of training) or `evaluation/autoattack_accuracy` (`tf_free.evaluate`).
    Merged with the results already there (a tag written again replaces its
    value) into one event file (its name ends in `.results`): one point a tag.
    """
    old_files = _files(log_dir, "results")
    merged = {}  # tag -> (step, value, description)
    for path in old_files:
        for record in _records(path):
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                merged[value.tag] = (event.step, number, value.metadata.summary_description)
    for tag, (number, description) in results.items():
        merged[tag] = (step, float(number), description)
    temporary = os.path.join(log_dir, ".writing")
    shutil.rmtree(temporary, ignore_errors=True)
    writer = tf.summary.create_file_writer(temporary, filename_suffix=".results")
    with writer.as_default():
        for tag, (at, number, description) in merged.items():
            tf.summary.scalar(tag, number, step=at, description=description)
    writer.close()
    for path in old_files:
        os.remove(path)
    for path in glob.glob(os.path.join(temporary, "events.out.tfevents.*")):
        os.replace(path, os.path.join(log_dir, os.path.basename(path)))
    shutil.rmtree(temporary, ignore_errors=True)


def write_final(log_dir: str, results: dict, examples: str) -> None:
    """A run's `results.json` (its end-of-training accuracies on `examples`, e.g. "the
    first 1000 test examples", and its train minutes) as `final/*` results."""
    values = {
        f"final/{key}": (value, f"At the end of training, on {examples}.")
        for key, value in results.items()
        if key.endswith("_accuracy") and not key.startswith("train_")
    }
    values["final/train_minutes"] = (results["train_minutes"], "Training time, without evaluation.")
    write_results(log_dir, values, results["iterations"])


def write_evaluation(log_dir: str, results: dict[str, tuple[float, str]], step: int) -> None:
    """The accuracies of the exported model (attack name -> (accuracy, description)),
    as `evaluation/<attack>_accuracy` results."""
    write_results(
        log_dir,
        {evaluation_tag(attack): value for attack, value in results.items()},
        step,
    )


# --- Resuming --------------------------------------------------------------------------


def truncate_after(log_dir: str, step: int) -> int:
    """Removes every event with a step above `step` from the event files under `log_dir`.

    A run killed after its last checkpoint has written points that the resumed
    run writes again; this keeps one of each. Files are rewritten next to
    themselves and renamed into place. Returns the number of events removed.
    """
    removed = 0
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        records = _records(path)
        kept = [r for r in records if tf.compat.v1.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        removed += len(records) - len(kept)
        with tf.io.TFRecordWriter(path + ".tmp") as writer:
            for record in kept:
                writer.write(record)
        os.replace(path + ".tmp", path)
    return removed


def _records(path: str) -> list[bytes]:
    """The whole records of an event file (a kill mid-write can cut the last one)."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            records.append(record)
    except tf.errors.DataLossError:
        pass
    return records
