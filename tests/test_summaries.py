"""tf_free.summaries: training curves on the iteration axis, HParams, resume truncation.

Read back with TensorBoard's own reader (event_accumulator; TF2 writes
scalars as tensors).
"""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import EPSILON, LR, MOMENTUM, make_base, make_batches, read_tensors
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tf_free import loop, summaries
from tf_free.config import TrainConfig
from tf_free.free import FreeAdversarialModel

REPLAYS, BATCHES, PASSES = 2, 4, 2  # 16 iterations
BATCH = 8


def _dataset():
    batches = make_batches((BATCH,) * BATCHES, seed=3)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


class _PassLogs(keras.callbacks.Callback):
    """Keras's logs at the end of each pass (its metrics: means over the pass)."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def on_epoch_end(self, epoch, logs=None):
        self.passes.append(dict(logs))


def _train(tmp_path, log_every, schedule=None):
    """Free training (m=2) through `loop.fit`, as `tf_free.train` runs it."""
    model = FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=REPLAYS)
    rate = schedule or LR
    model.compile(
        optimizer=keras.optimizers.SGD(rate, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")],
    )
    model.optimizer.build(model.trainable_variables)
    model.build_perturbation((BATCH, *make_base().input_shape[1:]))
    strategy = tf.distribute.get_strategy()
    state = loop.TrainState(model, str(tmp_path / "checkpoints"), strategy)
    logs = str(tmp_path / "logs")
    training = summaries.TrainingSummaries(
        logs, log_every=log_every, epsilon=EPSILON, perturbation=model.perturbation
    )
    passes = _PassLogs()
    loop.fit(
        model,
        lambda pass_, skip: _dataset().skip(skip),
        strategy=strategy,
        passes=PASSES,
        batches_per_pass=BATCHES,
        state=state,
        callbacks=[training, passes],
        verbose=0,
        log_names={"loss": "adv_loss"},
    )
    return model, state, read_tensors(os.path.join(logs, "train")), passes.passes


@pytest.mark.parametrize(
    "log_every, steps",
    [
        # A batch is 2 iterations: a point after each batch that reaches a multiple.
        (2, [2, 4, 6, 8, 10, 12, 14, 16]),
        (3, [4, 6, 10, 12, 16]),  # 3, 6, 9, 12, 15 are reached at 4, 6, 10, 12, 16
        (8, [8, 16]),  # once a pass
    ],
)
def test_points_fall_on_the_iteration_axis(tmp_path, log_every, steps):
    _, _, scalars, _ = _train(tmp_path, log_every)
    expected = {
        "train/adv_loss",
        "train/adv_accuracy",
        "train/learning_rate",
        "train/delta_mean_abs_over_epsilon",
        "train/delta_fraction_at_epsilon",
        "train/delta_over_epsilon",  # a histogram, every 10 points
        "time/train_minutes",
        "time/iterations_per_second",
    }
    assert set(scalars) == expected
    for tag in expected - {"train/delta_over_epsilon", "time/iterations_per_second"}:
        assert [step for step, _ in scalars[tag]] == steps, tag
    assert [s for s, _ in scalars["train/delta_over_epsilon"]] == steps[::10]


def test_window_means_agree_with_the_pass_means(tmp_path):
    """Once a pass, the window is the pass: Keras's own pass means."""
    _, _, scalars, passes = _train(tmp_path, log_every=BATCHES * REPLAYS)
    for name in ("adv_loss", "adv_accuracy"):
        got = [float(v) for _, v in scalars[f"train/{name}"]]
        assert got == pytest.approx([p[name] for p in passes], rel=1e-5), name


def test_every_batch_window_means_average_to_the_pass_means(tmp_path):
    """One point a batch: the batches' values, whose mean is the pass's (equal batches)."""
    _, _, scalars, passes = _train(tmp_path, log_every=REPLAYS)
    for name in ("adv_loss", "adv_accuracy"):
        values = np.array([float(v) for _, v in scalars[f"train/{name}"]]).reshape(PASSES, -1)
        assert values.mean(axis=1) == pytest.approx([p[name] for p in passes], rel=1e-5)
    accuracy = [float(v) for _, v in scalars["train/adv_accuracy"]]
    assert all(v * BATCH == pytest.approx(round(v * BATCH)) for v in accuracy)  # k/8


def test_learning_rate_is_the_schedule_at_the_last_iteration(tmp_path):
    schedule = keras.optimizers.schedules.CosineDecay(LR, PASSES * BATCHES * REPLAYS)
    _, _, scalars, _ = _train(tmp_path, log_every=4, schedule=schedule)
    for step, value in scalars["train/learning_rate"]:
        assert float(value) == pytest.approx(float(schedule(step - 1)), rel=1e-6)


def test_delta_statistics_are_those_of_delta(tmp_path):
    model, _, scalars, _ = _train(tmp_path, log_every=4)
    ratio = np.abs(model.perturbation.numpy()) / EPSILON
    mean_abs = [float(v) for _, v in scalars["train/delta_mean_abs_over_epsilon"]]
    at_epsilon = [float(v) for _, v in scalars["train/delta_fraction_at_epsilon"]]
    assert all(0 <= v <= 1 for v in mean_abs + at_epsilon)
    # The last point is after the last iteration: δ as training left it.
    assert mean_abs[-1] == pytest.approx(ratio.mean(), rel=1e-5)
    assert at_epsilon[-1] == pytest.approx(np.mean(ratio >= 1 - 1e-4), rel=1e-5)
    assert 0 < at_epsilon[-1] < 1  # the sign steps pushed some entries to ±ε, not all


def test_train_minutes_are_the_state_training_time(tmp_path):
    _, state, scalars, _ = _train(tmp_path, log_every=2)
    minutes = [float(v) for _, v in scalars["time/train_minutes"]]
    assert minutes == sorted(minutes)
    # The end of training adds only the last checkpoint after the last point.
    assert minutes[-1] <= float(state.seconds) / 60 < minutes[-1] + 0.05
    rates = [float(v) for _, v in scalars["time/iterations_per_second"]]
    assert all(r > 0 for r in rates)


def test_bad_log_every_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        summaries.TrainingSummaries(str(tmp_path), log_every=0)


def _header(log_dir):
    events = event_accumulator.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    events.Reload()
    return events


def test_run_header_holds_the_hparams_session_and_the_config(tmp_path):
    config = TrainConfig(model_dir=str(tmp_path / "free_m4"), m=4, epsilon=8.0, eval_pgd_steps=10)
    log_dir = str(tmp_path / "free_m4" / "logs")
    summaries.write_run_header(config, log_dir, command=["tf_free.train", "--m=4"])
    summaries.write_run_header(config, log_dir, command=["tf_free.train", "--m=4"])  # again
    assert len(glob.glob(os.path.join(log_dir, "events.out.tfevents.*.header"))) == 1
    events = _header(log_dir)
    tags = set(events.Tags()["tensors"])
    assert {"config", "command"} <= tags
    command = tf.make_ndarray(events.Tensors("command")[0].tensor_proto)
    assert b"--m=4" in command.item()
    content = events.PluginTagToContent("hparams")
    session = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG]
    )
    values = {k: v.ListFields()[0][1] for k, v in session.hparams.items()}
    assert values["method"] == "free" and values["m"] == 4 and values["epsilon_255"] == 8.0
    assert values["step_size_255"] == 8.0 and values["model"] == "small_cnn"
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG]
    )
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"final/pgd10_accuracy", "evaluation/autoattack_accuracy"} <= metrics


def test_every_run_declares_every_methods_hparams_key_ones_first(tmp_path):
    """TensorBoard takes the first config it finds: a natural run's must list m too."""
    config = TrainConfig(model_dir=str(tmp_path / "natural"), method="natural")
    summaries.write_run_header(config, str(tmp_path / "logs"), command="test")
    content = _header(str(tmp_path / "logs")).PluginTagToContent("hparams")
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG]
    )
    infos = {info.name: info.differs for info in experiment.hparam_infos}
    assert {"method", "m", "pgd_steps", "epsilon_255", "step_size_255", "model"} <= set(infos)
    # Sorted first and ticked by TensorBoard's HParams table (it marks `differs` first).
    assert {name for name, first in infos.items() if first} == set(summaries.KEY_HPARAMS)


def test_pgd_and_natural_runs_have_their_own_hparams():
    pgd = summaries.hparams_of(TrainConfig(method="pgd", pgd_steps=7, epsilon=8.0))
    assert pgd["pgd_steps"] == 7 and pgd["step_size_255"] == pytest.approx(2.5 * 8 / 7)
    assert "m" not in pgd
    natural = summaries.hparams_of(TrainConfig(method="natural"))
    assert "step_size_255" not in natural and "m" not in natural


def test_results_are_merged_one_point_each_beside_the_header(tmp_path):
    config = TrainConfig(model_dir=str(tmp_path / "run"))
    summaries.write_run_header(config, str(tmp_path), command="test")
    summaries.write_evaluation(str(tmp_path), {"pgd20": (0.5, "PGD-20"), "natural": (0.9, "")}, 100)
    summaries.write_evaluation(
        str(tmp_path), {"pgd20": (0.55, "again"), "autoattack": (0.4, "AA")}, 100
    )
    summaries.write_run_header(config, str(tmp_path), command="again")  # keeps the results
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*.results"))) == 1
    scalars = read_tensors(str(tmp_path))
    scalars = {
        k: [(s, float(v)) for s, v in vals]
        for k, vals in scalars.items()
        if k.startswith("evaluation/")
    }
    assert scalars == {
        "evaluation/natural_accuracy": [(100, pytest.approx(0.9))],
        "evaluation/pgd20_accuracy": [(100, pytest.approx(0.55))],  # measured again: replaced
        "evaluation/autoattack_accuracy": [(100, pytest.approx(0.4))],
    }
    events = _header(str(tmp_path))
    assert events.SummaryMetadata("evaluation/pgd20_accuracy").summary_description == "again"
    assert {"config", "command"} <= set(events.Tags()["tensors"])


def test_hparams_metrics_are_found_where_tensorboard_looks_for_them(tmp_path):
    """TensorBoard joins the session and the metric's group as strings: the session's
    own run must hold the metrics, for --logdir at the run's logs/ (session ".") or above."""
    config = TrainConfig(model_dir=str(tmp_path / "run"))
    summaries.write_run_header(config, str(tmp_path), command="test")
    content = _header(str(tmp_path)).PluginTagToContent("hparams")
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG]
    )
    assert {m.name.group for m in experiment.metric_infos} == {""}
    assert {
        "final/clean_accuracy",
        "final/pgd20_accuracy",
        "evaluation/pgd20_accuracy",
        "evaluation/autoattack_accuracy",
        "final/train_minutes",
    } == {m.name.tag for m in experiment.metric_infos} - {"evaluation/natural_accuracy"}


def test_truncate_after_keeps_the_points_up_to_the_checkpoint(tmp_path):
    for run in ("train", "robustness"):
        writer = tf.summary.create_file_writer(str(tmp_path / run))
        with writer.as_default():
            for step in range(1, 11):
                tf.summary.scalar(f"{run}/x", step / 10, step=step)
        writer.close()
    path = glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))[0]
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00")  # a record cut short by a kill
    removed = summaries.truncate_after(str(tmp_path), 6)
    assert removed == 2 * 4
    for run in ("train", "robustness"):
        steps = [s for s, _ in read_tensors(str(tmp_path / run))[f"{run}/x"]]
        assert steps == [1, 2, 3, 4, 5, 6]
    assert summaries.truncate_after(str(tmp_path), 6) == 0  # nothing more to cut


def test_final_results_come_from_results_json(tmp_path):
    results = {
        "clean_accuracy": 0.8,
        "pgd20_accuracy": 0.7,
        "train_adv_accuracy": 0.6,  # training's, on x+δ: not a final result
        "train_minutes": 2.5,
        "iterations": 3752,
    }
    summaries.write_final(str(tmp_path), results, "the first 1000 test examples")
    scalars = read_tensors(str(tmp_path))
    assert {k: [(s, round(float(v), 6)) for s, v in vals] for k, vals in scalars.items()} == {
        "final/clean_accuracy": [(3752, 0.8)],
        "final/pgd20_accuracy": [(3752, 0.7)],
        "final/train_minutes": [(3752, 2.5)],
    }
