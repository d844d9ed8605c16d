"""MirroredStrategy over two logical CPUs (stand-ins for two GPUs) against one device."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import EPSILON, IMAGE_SHAPE, as_dataset, compile_model, make_base, make_batches

from tf_free import FreeAdversarialModel, PGDAdversarialModel


def _fit(make_model, batches, strategy=None):
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        model = compile_model(make_model())
    history = model.fit(as_dataset(batches), epochs=2, verbose=0, shuffle=False)
    return model, history.history["loss"]


def test_pgd_training_two_replicas_match_one_device():
    # Without a random start: the start noise is drawn per batch shape, so
    # with it the two runs would attack from different (equally random) points.
    def make():
        return PGDAdversarialModel(
            make_base(), epsilon=EPSILON, steps=3, step_size=0.04, random_start=False
        )

    batches = make_batches((16, 16))
    single, single_loss = _fit(make, batches)
    mirrored, mirrored_loss = _fit(
        make, batches, tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    )
    for got, want in zip(mirrored.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)


def test_free_short_last_batch_uses_each_replicas_first_rows():
    """The deliberate choice for a short last batch under R replicas.

    tf.distribute splits a short global batch of n evenly, so each replica
    gets n/R examples and uses (and updates) the first n/R rows of its own δ;
    the other rows keep their values for the next epoch.
    """
    batches = make_batches((16, 16, 6))
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    after_short = [d.numpy() for d in strategy.experimental_local_results(model.perturbation)]
    assert [d.shape[0] for d in after_short] == [8, 8]
    # Replay the first two (full) batches alone: rows 3.. of each replica's δ
    # must be what they were before the short batch.
    with strategy.scope():
        reference = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    reference.fit(as_dataset(batches[:2]), epochs=1, verbose=0, shuffle=False)
    before_short = [d.numpy() for d in strategy.experimental_local_results(reference.perturbation)]
    for after, before in zip(after_short, before_short):
        np.testing.assert_allclose(after[3:], before[3:], rtol=1e-5, atol=1e-6)
        assert not np.allclose(after[:3], before[:3])  # the first 3 rows took the short batch
        assert np.abs(after).max() <= EPSILON + 1e-6


def test_free_model_under_two_replicas_exports_and_checkpoints(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    batches = make_batches((16, 16))
    with strategy.scope():
        model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    # δ (ON_READ, MEAN) does not stop the model from being exported or checkpointed.
    model.export(str(tmp_path / "export"), verbose=False)
    x = batches[0][0]
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(loaded.serve(x), model(x), rtol=1e-5, atol=1e-5)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert any("perturbation" in name for name in names)
    assert keras.ops.all(keras.ops.isfinite(model.perturbation.read_value()))


def _free(strategy=None, jit_compile=False):
    with (strategy or tf.distribute.get_strategy()).scope():
        return compile_model(
            FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2), jit_compile
        )


def _global_delta(model):
    values = model.distribute_strategy.experimental_local_results(model.perturbation)
    return np.concatenate([v.numpy() for v in values])


@pytest.mark.parametrize("save_replicas,restore_replicas", [(2, 1), (1, 2)])
def test_checkpoint_restores_across_replica_counts(tmp_path, save_replicas, restore_replicas):
    """δ is checkpointed as the global batch's rows, so R replicas restore under R'.

    Reference: training on, from the restored state, must give what the run
    that saved would have given (one device and two replicas train alike).
    """

    def strategy(replicas):
        return tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]) if replicas == 2 else None

    first, second = make_batches((16, 16)), make_batches((16, 16), seed=7)
    saver = _free(strategy(save_replicas))
    saver.fit(as_dataset(first), epochs=1, verbose=0, shuffle=False)
    saved_delta = _global_delta(saver)
    assert np.abs(saved_delta).max() > 0
    path = tf.train.Checkpoint(model=saver, optimizer=saver.optimizer).save(str(tmp_path / "c"))

    restored = _free(strategy(restore_replicas))
    restored.build_perturbation((16 // restore_replicas, *IMAGE_SHAPE))
    with restored.distribute_strategy.scope():
        restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(
        path
    ).assert_existing_objects_matched()
    np.testing.assert_array_equal(_global_delta(restored), saved_delta)
    if restore_replicas == 2:  # each replica holds its own half, not the mean
        halves = [v.numpy() for v in restored.perturbation.values]
        np.testing.assert_array_equal(halves[0], saved_delta[:8])
        np.testing.assert_array_equal(halves[1], saved_delta[8:])
    for got, want in zip(restored.get_weights(), saver.get_weights()):
        np.testing.assert_array_equal(got, want)

    saver.fit(as_dataset(second), epochs=1, verbose=0, shuffle=False)
    restored.fit(as_dataset(second), epochs=1, verbose=0, shuffle=False)
    for got, want in zip(restored.get_weights(), saver.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_global_delta(restored), _global_delta(saver), atol=1e-6)


def test_checkpoint_with_another_global_batch_is_a_clear_error(tmp_path):
    saver = _free()
    saver.fit(as_dataset(make_batches((16,))), epochs=1, verbose=0, shuffle=False)
    path = tf.train.Checkpoint(model=saver).save(str(tmp_path / "c"))
    other = _free(tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
    other.build_perturbation((4, *IMAGE_SHAPE))  # global batch 8, not 16
    with pytest.raises(
        ValueError, match=r"perturbation δ has shape \[16, 8, 8, 1\].*\[8, 8, 8, 1\]"
    ):
        tf.train.Checkpoint(model=other).restore(path)


@pytest.mark.parametrize("model_class", ["free", "pgd"])
def test_xla_per_replica_under_two_replicas_matches_no_xla(model_class):
    """jit_compile="per_replica": each replica's forward/backward (and attack) in XLA."""

    def make():
        if model_class == "free":
            return FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2)
        return PGDAdversarialModel(
            make_base(), epsilon=EPSILON, steps=2, step_size=0.05, random_start=False
        )

    batches = make_batches((16, 16, 6))
    results = {}
    for jit in (False, "per_replica"):
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
        with strategy.scope():
            model = compile_model(make(), jit_compile=jit)
        history = model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
        results[jit] = (model, history.history["loss"])
    xla, plain = results["per_replica"][0], results[False][0]
    assert xla.uses_xla() and xla.xla_per_replica and not xla.jit_compile  # whole step: no XLA
    assert xla._xla_functions  # the per-replica function was compiled and used
    for got, want in zip(xla.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results["per_replica"][1], results[False][1], rtol=1e-4)
    if model_class == "free":
        np.testing.assert_allclose(_global_delta(xla), _global_delta(plain), atol=1e-5)


def test_delta_statistics_cover_every_replicas_delta(tmp_path):
    """tf_free.summaries reads δ of both replicas, as the chief writes it under mirrored."""
    from tf_free import summaries

    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    model = _free(strategy)
    training = summaries.TrainingSummaries(
        str(tmp_path), log_every=2, epsilon=EPSILON, perturbation=None
    )
    model.fit(as_dataset(make_batches((16, 16))), epochs=1, verbose=0, shuffle=False)
    training.perturbation = model.perturbation
    training.set_model(model)
    training.set_params({})
    training.on_train_begin()
    training.on_epoch_begin(0)
    model.optimizer.iterations.assign_add(2)  # as after one more batch of 2 replays
    training.on_train_batch_end(0, {"adv_loss": 1.0})
    training.on_train_end()
    events = tf.compat.v1.train.summary_iterator(
        next((tmp_path / "train").glob("events.out.tfevents.*")).as_posix()
    )
    values = {v.tag: tf.make_ndarray(v.tensor) for e in events for v in e.summary.value}
    histogram = values.pop("train/delta_over_epsilon")  # [left, right, count] per bucket
    assert histogram[:, 2].sum() == 16 * np.prod(IMAGE_SHAPE)  # every entry of both δ
    ratio = np.abs(_global_delta(model)) / EPSILON
    assert ratio.shape[0] == 16  # both replicas' 8 rows
    assert values["train/delta_mean_abs_over_epsilon"] == pytest.approx(ratio.mean(), rel=1e-5)
    assert values["train/delta_fraction_at_epsilon"] == pytest.approx(
        np.mean(ratio >= 1 - 1e-4), rel=1e-5
    )
