"""tf_free.loop.fit (the application's loop) against Keras's own fit."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import EPSILON, IMAGE_SHAPE, as_dataset, compile_model, make_base, make_batches

from tf_free import FreeAdversarialModel, PGDAdversarialModel, loop


def _model(kind, strategy=None, jit_compile=False):
    with (strategy or tf.distribute.get_strategy()).scope():
        if kind == "free":
            model = FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2)
        else:
            model = PGDAdversarialModel(
                make_base(), epsilon=EPSILON, steps=2, step_size=0.05, random_start=False
            )
        model = compile_model(model, jit_compile=jit_compile)
        model.optimizer.build(model.trainable_variables)
        if kind == "free":
            model.build_perturbation(
                (16 // model.distribute_strategy.num_replicas_in_sync, *IMAGE_SHAPE)
            )
    return model


def _loop_fit(model, batches, tmp_path, passes=2, **kwargs):
    strategy = model.distribute_strategy
    state = loop.TrainState(model, str(tmp_path), strategy)
    history = loop.fit(
        model,
        lambda pass_, skip: as_dataset(batches).skip(skip),
        strategy=strategy,
        passes=passes,
        batches_per_pass=len(batches),
        state=state,
        verbose=0,
        **kwargs,
    )
    return history.history["loss"]


@pytest.mark.parametrize("kind", ["free", "pgd"])
def test_loop_matches_keras_fit(kind, tmp_path):
    batches = make_batches((16, 16, 6))
    keras_model = _model(kind)
    keras_loss = keras_model.fit(as_dataset(batches), epochs=2, verbose=0, shuffle=False)
    ours = _model(kind)
    our_loss = _loop_fit(ours, batches, tmp_path)
    for got, want in zip(ours.get_weights(), keras_model.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(our_loss, keras_loss.history["loss"], rtol=1e-6)
    if kind == "free":
        np.testing.assert_allclose(ours.perturbation.numpy(), keras_model.perturbation.numpy())
    assert int(ours.optimizer.iterations.numpy()) == int(keras_model.optimizer.iterations.numpy())


def test_loop_under_two_replicas_matches_one_device(tmp_path):
    batches = make_batches((16, 16))
    single = _model("free")
    _loop_fit(single, batches, tmp_path / "one")
    mirrored = _model("free", tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
    _loop_fit(mirrored, batches, tmp_path / "two")
    for got, want in zip(mirrored.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    halves = mirrored.distribute_strategy.experimental_local_results(mirrored.perturbation)
    np.testing.assert_allclose(
        np.concatenate([h.numpy() for h in halves]), single.perturbation.numpy(), atol=1e-6
    )


@pytest.mark.parametrize("jit,replicas", [(True, 1), ("per_replica", 2)])
def test_loop_with_xla_matches_without(jit, replicas, tmp_path):
    batches = make_batches((16, 16, 6))
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]) if replicas == 2 else None
    plain = _model("free", strategy)
    _loop_fit(plain, batches, tmp_path / "plain")
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]) if replicas == 2 else None
    xla = _model("free", strategy, jit_compile=jit)
    _loop_fit(xla, batches, tmp_path / "xla")
    # XLA stayed on (no fallback) and, per replica, the compiled function ran.
    assert xla.uses_xla()
    if jit is True:
        assert xla.jit_compile is True
    else:
        assert xla.xla_per_replica and xla._xla_functions
    for got, want in zip(xla.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _PythonIdentity(keras.layers.Layer):
    """tf.py_function: runs anywhere, but XLA cannot compile it."""

    def call(self, x):
        y = tf.py_function(lambda t: t, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def _base_without_xla():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            _PythonIdentity(),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize("jit,replicas", [(True, 1), ("per_replica", 2)])
def test_a_step_xla_cannot_compile_goes_on_without_xla(jit, replicas, tmp_path, caplog):
    batches = make_batches((16, 16, 6))
    results = []
    for setting in (False, jit):
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]) if replicas == 2 else None
        with (strategy or tf.distribute.get_strategy()).scope():
            model = FreeAdversarialModel(_base_without_xla(), epsilon=EPSILON, replays=2)
            compile_model(model, jit_compile=setting)
            model.optimizer.build(model.trainable_variables)
            model.build_perturbation((16 // replicas, *IMAGE_SHAPE))
        with caplog.at_level(logging.WARNING):
            _loop_fit(model, batches, tmp_path / str(setting))
        results.append(model)
    assert "XLA cannot compile this train step" in caplog.text
    assert not results[1].uses_xla()
    assert not results[1].jit_compile and not results[1].xla_per_replica
    for got, want in zip(results[1].get_weights(), results[0].get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_plain_keras_model_trains_as_keras_fit(tmp_path):
    """Natural training: a keras.Model without tf_free's methods (uses_xla, ...)."""
    batches = make_batches((16, 16, 6))
    keras_model = compile_model(make_base())
    keras_loss = keras_model.fit(as_dataset(batches), epochs=2, verbose=0, shuffle=False)
    ours = compile_model(make_base())
    ours.optimizer.build(ours.trainable_variables)
    assert not hasattr(ours, "uses_xla")
    our_loss = _loop_fit(ours, batches, tmp_path)
    for got, want in zip(ours.get_weights(), keras_model.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(our_loss, keras_loss.history["loss"], rtol=1e-6)


def test_plain_keras_model_goes_on_without_xla(tmp_path, caplog):
    batches = make_batches((16, 16, 6))
    results = []
    for setting in (False, True):
        model = compile_model(_base_without_xla(), jit_compile=setting)
        model.optimizer.build(model.trainable_variables)
        with caplog.at_level(logging.WARNING):
            _loop_fit(model, batches, tmp_path / str(setting))
        results.append(model)
    assert "XLA cannot compile this train step" in caplog.text
    assert results[1].jit_compile is False
    for got, want in zip(results[1].get_weights(), results[0].get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# The checkpoint's keys for where training is, as the first runs wrote them.
OLD_KEYS = {
    "epoch/.ATTRIBUTES/VARIABLE_VALUE",
    "batch_in_epoch/.ATTRIBUTES/VARIABLE_VALUE",
    "train_seconds/.ATTRIBUTES/VARIABLE_VALUE",
    "model/_perturbation/.ATTRIBUTES/global_perturbation",
}


def test_checkpoint_keys_are_those_of_existing_runs(tmp_path):
    model = _model("free")
    state = loop.TrainState(model, str(tmp_path), tf.distribute.get_strategy())
    state.save_at(3, 7)
    names = {name for name, _ in tf.train.list_variables(state.latest)}
    assert OLD_KEYS <= names


def test_checkpoint_written_with_the_old_layout_restores(tmp_path):
    """A checkpoint as TrainState wrote it before its attributes were renamed."""
    old = _model("free")
    old.perturbation.assign(tf.fill(old.perturbation.shape, 0.25))
    tf.train.Checkpoint(
        model=old,
        optimizer=old.optimizer,
        epoch=tf.Variable(3, dtype=tf.int64),
        batch_in_epoch=tf.Variable(7, dtype=tf.int64),
        train_seconds=tf.Variable(12.5, dtype=tf.float64),
    ).save(str(tmp_path / "ckpt"))
    new = _model("free")
    state = loop.TrainState(new, str(tmp_path), tf.distribute.get_strategy())
    assert state.restore()  # (which asserts that the existing objects matched)
    assert (int(state.passes_done), int(state.batches_done), float(state.seconds)) == (3, 7, 12.5)
    np.testing.assert_array_equal(new.perturbation.numpy(), old.perturbation.numpy())
    for got, want in zip(new.get_weights(), old.get_weights()):
        np.testing.assert_array_equal(got, want)


# --- Several steps per call (--steps_per_loop) ------------------------------------------


class _Calls(keras.callbacks.Callback):
    """Records each call as the callbacks see it: (pass, first batch, last batch, iterations)."""

    def __init__(self):
        super().__init__()
        self.calls, self.pass_ = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.pass_ = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.first = batch

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append((self.pass_, self.first, batch, loop.iterations(self.model)))


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("kind", ["free", "pgd", "natural"])
def test_several_steps_per_call_give_bitwise_the_weights_of_one(kind, replicas, tmp_path):
    """7 batches a pass in calls of 3: (0-2), (3-5), (6): the same batches in the same order,
    so the same weights and δ, under the default strategy and mirrored. (Without op
    determinism a sum may round in another order: one ulp. Bit for bit with
    --deterministic: tests/test_resume.py.)"""
    batches = make_batches((16,) * 6 + (8,))
    results = []
    for steps in (1, 3):
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]) if replicas == 2 else None
        if kind == "natural":
            with (strategy or tf.distribute.get_strategy()).scope():
                model = compile_model(make_base())
                model.optimizer.build(model.trainable_variables)
        else:
            model = _model(kind, strategy)
        calls = _Calls()
        loss = _loop_fit(
            model, batches, tmp_path / str(steps), steps_per_loop=steps, callbacks=[calls]
        )
        results.append((model, loss, calls.calls))
    (one, one_loss, one_calls), (three, three_loss, three_calls) = results
    for got, want in zip(three.get_weights(), one.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if kind == "free":
        np.testing.assert_allclose(
            np.concatenate(
                three.distribute_strategy.experimental_local_results(three.perturbation)
            ),
            np.concatenate(one.distribute_strategy.experimental_local_results(one.perturbation)),
        )
    np.testing.assert_allclose(three_loss, one_loss, rtol=1e-6)  # each pass's mean loss
    per_batch = 2 if kind == "free" else 1
    assert [c[:3] for c in three_calls] == [
        (p, first, last) for p in (0, 1) for first, last in ((0, 2), (3, 5), (6, 6))
    ]
    # The callbacks see the iterations of the call's last batch.
    assert [c[3] for c in three_calls] == [
        per_batch * (7 * p + last + 1) for p in (0, 1) for last in (2, 5, 6)
    ]
    assert [c[3] for c in one_calls] == [per_batch * (i + 1) for i in range(14)]


def test_a_resumed_pass_realigns_its_calls_and_checkpoints_at_multiples(tmp_path):
    """Calls end at multiples of steps_per_loop within the pass, also after a resume from
    batch 2; checkpoints every 4 batches; the result equals one uninterrupted run."""
    batches = make_batches((16,) * 9)
    reference = _model("free")
    _loop_fit(reference, batches, tmp_path / "reference", passes=1)

    model = _model("free")
    state = loop.TrainState(model, str(tmp_path / "run"), model.distribute_strategy)
    stop = keras.callbacks.LambdaCallback(  # as a run killed after its checkpoint of batch 2
        on_train_batch_end=lambda batch, logs: setattr(model, "stop_training", batch == 1)
    )
    loop.fit(
        model,
        lambda pass_, skip: as_dataset(batches).skip(skip),
        strategy=model.distribute_strategy,
        passes=1,
        batches_per_pass=9,
        state=state,
        callbacks=[stop],
        verbose=0,
    )
    assert (int(state.passes_done), int(state.batches_done)) == (0, 2)
    resumed = _model("free")
    state = loop.TrainState(resumed, str(tmp_path / "run"), resumed.distribute_strategy)
    assert state.restore()
    calls, saved = _Calls(), []
    save_at = state.save_at
    state.save_at = lambda p, b: (saved.append((p, b)), save_at(p, b))
    loop.fit(
        resumed,
        lambda pass_, skip: as_dataset(batches).skip(skip),
        strategy=resumed.distribute_strategy,
        passes=1,
        batches_per_pass=9,
        state=state,
        callbacks=[calls],
        checkpoint_every=4,
        steps_per_loop=4,
        verbose=0,
    )
    assert [c[1:3] for c in calls.calls] == [(2, 3), (4, 7), (8, 8)]
    assert saved == [(0, 4), (0, 8), (1, 0)]
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_checkpoint_every_must_be_a_multiple_of_steps_per_loop(tmp_path):
    model = _model("free")
    with pytest.raises(ValueError, match="multiple of steps_per_loop=4"):
        _loop_fit(model, make_batches((16,) * 4), tmp_path, steps_per_loop=4, checkpoint_every=6)
    assert int(model.optimizer.iterations.numpy()) == 0  # checked before any step


def test_a_nan_inside_a_call_names_the_calls_batches(tmp_path):
    """The dense kernel turns NaN before the second call (batches 5-8 of 8)."""
    model = _model("free")

    def poison(batch, logs):
        if batch == 4:
            kernel = model.trainable_variables[-2]
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    with pytest.raises(loop.TrainingError, match=r"at pass 1, batches 5-8 \(iteration 16\)"):
        _loop_fit(
            model,
            make_batches((16,) * 8),
            tmp_path,
            passes=1,
            steps_per_loop=4,
            callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=poison)],
        )
