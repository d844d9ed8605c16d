"""The stall at the end of `fit`/evaluation (tf.data autotuning): scripts/fit_stall.py runs,
and the workaround, `evaluation.without_autotune`, is where tf_free applies it.

Behaviour only: whether a call stalls is a race (scripts/fit_stall.py times it), so
nothing here is timed.
"""

import functools
import inspect
import json
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf
from helpers import (
    ENV,
    EPSILON,
    IMAGE_SHAPE,
    REPO,
    as_dataset,
    compile_model,
    make_base,
    make_batches,
)

from tf_free import (
    FastAdversarialModel,
    FreeAdversarialModel,
    PGDAdversarialModel,
    callbacks,
    evaluation,
    loop,
)


def _dataset():
    return as_dataset(make_batches((8, 8)))


def _autotuned(dataset, enabled=True):
    options = tf.data.Options()
    options.autotune.enabled = enabled
    return dataset.with_options(options)


def test_without_autotune_turns_autotuning_off_and_keeps_other_options():
    options = tf.data.Options()
    options.deterministic = False
    dataset = evaluation.without_autotune(_dataset().with_options(options))
    assert dataset.options().autotune.enabled is False
    assert dataset.options().deterministic is False
    assert [b[1].numpy().tolist() for b in dataset] == [b[1].numpy().tolist() for b in _dataset()]


def test_without_autotune_keeps_an_explicit_choice_and_other_inputs():
    on = _autotuned(_dataset(), True)
    assert evaluation.without_autotune(on) is on  # the user asked for autotuning (and the wait)
    off = _autotuned(_dataset(), False)
    assert evaluation.without_autotune(off) is off
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])  # conftest's logical CPUs
    distributed = strategy.experimental_distribute_dataset(_dataset())
    assert evaluation.without_autotune(distributed) is distributed
    arrays = make_batches((4,))[0]
    assert evaluation.without_autotune(arrays) is arrays


def test_robustness_evaluation_iterates_without_autotuning(tmp_path):
    def evaluation_of(dataset):
        return callbacks.RobustnessEvaluation(
            dataset, log_dir=str(tmp_path), epsilon=EPSILON, step_size=0.05, steps=1
        )

    assert evaluation_of(_dataset()).dataset.options().autotune.enabled is False
    assert evaluation_of(_autotuned(_dataset())).dataset.options().autotune.enabled is True


def test_evaluate_attacks_iterates_without_autotuning(monkeypatch):
    seen = []

    def accuracy(model, dataset, *args, **kwargs):
        seen.append(dataset.options().autotune.enabled)
        return 1.0

    monkeypatch.setattr(evaluation.attacks, "accuracy_under_attack", accuracy)
    evaluation.evaluate_attacks(
        None, _dataset(), ["natural", "pgd2"], epsilon=EPSILON, step_size=0.05, verbose=False
    )
    assert seen == [False, False]


@pytest.fixture
def keras_fit_arguments(monkeypatch):
    """The arguments Keras's own `fit` receives, by name (it still trains)."""
    seen = {}
    original = keras.Model.fit

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        seen.update(inspect.signature(original).bind(self, *args, **kwargs).arguments)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    return seen


def _models():
    return {
        "free": FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2),
        "fast": FastAdversarialModel(make_base(), epsilon=EPSILON, step_size=EPSILON),
        "pgd": PGDAdversarialModel(make_base(), epsilon=EPSILON, steps=1, step_size=EPSILON),
    }


@pytest.mark.parametrize("name", ["free", "fast", "pgd"])
def test_our_models_fit_without_autotuning(name, keras_fit_arguments):
    model = compile_model(_models()[name])
    model.fit(_dataset(), validation_data=_dataset(), epochs=1, verbose=0)
    assert keras_fit_arguments["x"].options().autotune.enabled is False
    assert keras_fit_arguments["validation_data"].options().autotune.enabled is False
    # A dataset that sets autotuning keeps it; arrays go through as they are.
    model.fit(_autotuned(_dataset()), epochs=1, verbose=0)
    assert keras_fit_arguments["x"].options().autotune.enabled is True
    x, y = make_batches((8,))[0]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert keras_fit_arguments["x"] is x and keras_fit_arguments["y"] is y


def test_free_fit_reads_the_first_batch_as_before(keras_fit_arguments):
    model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    model.fit(_dataset().repeat(), steps_per_epoch=3, epochs=1, verbose=0)
    assert model.perturbation.shape == (8, *IMAGE_SHAPE)
    assert keras_fit_arguments["steps_per_epoch"] == 3


@pytest.mark.slow  # a subprocess that traces four models (`-m 'not slow'` skips it)
def test_the_script_runs_every_path(tmp_path):
    """scripts/fit_stall.py with tiny settings: a row before and after for every path."""
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "fit_stall.py"),
            "--calls=2",
            "--call_seconds=0",
            "--batch_size=4",
            "--eval_pgd_steps=1",
            f"--json_out={out}",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,  # a loaded 2-core machine traces slowly
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["path"], r["workaround"]) for r in rows] == [
        (path, workaround)
        for path in ("keras_fit", "free_fit", "loop_fit", "evaluation")
        for workaround in (False, True)
    ]
    for row in rows:
        assert len(row["tails"]) == len(row["call_seconds"]) == 2
        assert all(t >= 0 for t in row["tails"])
    assert "| keras.Model.fit, repeated dataset | as it is (before) | 2 |" in done.stdout


def test_the_training_loop_iterates_without_autotuning_unless_asked(monkeypatch):
    """loop.fit's per-pass iterators: autotuning off, but kept where the dataset sets it (the
    ImageNet pipeline, whose decoding needs it on many-core hosts)."""
    seen = []
    strategy = tf.distribute.get_strategy()
    monkeypatch.setattr(
        strategy,
        "experimental_distribute_dataset",
        lambda dataset: seen.append(dataset.options().autotune.enabled) or dataset,
    )
    loop._distribute(strategy, _dataset())
    loop._distribute(strategy, _autotuned(_dataset()))
    assert seen == [False, True]
    # (The ImageNet pipeline sets it: tests/test_data.py, on mock ImageNet.)
