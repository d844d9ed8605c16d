"""The catastrophic-overfitting guard (tf_free/guard.py) through `loop.fit`."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import EPSILON, compile_model, make_base, make_batches

from tf_free import loop
from tf_free.config import ConfigError, TrainConfig
from tf_free.guard import OverfitGuard

BATCHES = make_batches((16, 16))


def _dataset(pass_, skip):
    x = np.concatenate([b[0] for b in BATCHES])
    y = np.concatenate([b[1] for b in BATCHES])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16).skip(skip)


class _Scripted(OverfitGuard):
    """PGD-5 accuracies given in advance; records the weights at every check."""

    def __init__(self, accuracies, **kwargs):
        super().__init__(BATCHES[0], epsilon=EPSILON, **kwargs)
        self.script = list(accuracies)
        self.weights_at_check = {}

    def accuracy(self):
        iteration = int(self.model.optimizer.iterations)
        self.weights_at_check[iteration] = [w.copy() for w in self.model.get_weights()]
        return self.script.pop(0)


def _fit(tmp_path, guard, passes=5, model=None):
    model = model or compile_model(make_base())
    model.optimizer.build(model.trainable_variables)
    strategy = tf.distribute.get_strategy()
    state = loop.TrainState(model, str(tmp_path / "checkpoints"), strategy)
    state.restore()  # a run started again resumes
    loop.fit(
        model,
        _dataset,
        strategy=strategy,
        passes=passes,
        batches_per_pass=2,
        state=state,
        callbacks=[guard],
        verbose=0,
    )
    return model


def test_a_drop_stops_training_and_restores_the_check_before(tmp_path, caplog):
    guard = _Scripted([0.5, 0.6, 0.1, 0.7, 0.7], directory=str(tmp_path / "guard"))
    model = _fit(tmp_path, guard)
    # Checks after passes 1, 2, 3 (iterations 2, 4, 6); 0.6 -> 0.1 is a drop of 0.5.
    assert guard.fired and int(guard.fired_at) == 6 and int(guard.restored_from) == 4
    assert sorted(guard.weights_at_check) == [2, 4, 6]  # passes 4 and 5 never ran
    assert int(model.optimizer.iterations) == 4  # the optimizer is restored too
    for got, want in zip(model.get_weights(), guard.weights_at_check[4]):
        np.testing.assert_array_equal(got, want)
    assert guard.report == (
        "overfit guard: catastrophic overfitting at iteration 6 (PGD-5 accuracy on the check "
        "batch 0.600 -> 0.100); training stopped and the weights of iteration 4 restored"
    )
    assert guard.report in caplog.text


def test_a_healthy_run_never_fires(tmp_path):
    # Falls, but never by more than 0.2 between two checks.
    guard = _Scripted([0.5, 0.35, 0.2, 0.3, 0.15], directory=str(tmp_path / "guard"))
    model = _fit(tmp_path, guard)
    assert not guard.fired and guard.report is None
    assert int(model.optimizer.iterations) == 10


def test_checks_every_n_batches(tmp_path):
    guard = _Scripted([0.5] * 10, directory=str(tmp_path / "guard"), every=1)
    _fit(tmp_path, guard, passes=2)
    assert sorted(guard.weights_at_check) == [1, 2, 3, 4]


def test_a_resumed_run_keeps_the_guards_state(tmp_path):
    first = _Scripted([0.5, 0.6], directory=str(tmp_path / "guard"))
    _fit(tmp_path, first, passes=2)  # then "killed"
    # Resumed (a new process): the previous accuracy is 0.6, so 0.3 is a drop.
    second = _Scripted([0.3], directory=str(tmp_path / "guard"))
    model = compile_model(make_base())
    state_model = _fit(tmp_path, second, passes=3, model=model)
    assert second.fired and int(second.fired_at) == 6 and int(second.restored_from) == 4
    # Started once more, a stopped run stays stopped.
    third = _Scripted([], directory=str(tmp_path / "guard"))
    again = _fit(tmp_path, third, passes=5, model=compile_model(make_base()))
    assert third.fired and int(again.optimizer.iterations) == int(state_model.optimizer.iterations)


def test_the_check_is_pgd5_accuracy_on_the_batch(tmp_path):
    model = compile_model(make_base())
    clean = OverfitGuard(BATCHES[0], epsilon=0.0, directory=str(tmp_path / "a"))
    clean.set_model(model)
    x, y = BATCHES[0]
    want = np.mean(np.argmax(model(x).numpy(), -1) == y)
    assert clean.accuracy() == pytest.approx(want)  # ε = 0: clean accuracy
    attacked = OverfitGuard(BATCHES[0], epsilon=0.3, directory=str(tmp_path / "b"))
    attacked.set_model(model)
    assert 0 <= attacked.accuracy() < want


def test_the_app_guards_fast_training_by_default():
    assert TrainConfig(method="fast").guarded
    assert not TrainConfig(method="free").guarded
    assert TrainConfig(method="free", overfit_guard="on").guarded
    assert not TrainConfig(method="fast", overfit_guard="off").guarded
    with pytest.raises(ConfigError, match="--overfit_guard runs on one process"):
        TrainConfig(method="fast", strategy="multi_worker").validate()
