"""MirroredStrategy over two logical CPUs (stand-ins for two GPUs) against one device."""

import keras
import numpy as np
import tensorflow as tf
from test_free import EPSILON, as_dataset, compile_model, make_base, make_batches

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
