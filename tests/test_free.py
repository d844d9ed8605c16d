"""FreeAdversarialModel and PGDAdversarialModel against hand-written references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    EPSILON,
    IMAGE_SHAPE,
    LR,
    MOMENTUM,
    as_dataset,
    compile_model,
    make_base,
    make_batches,
)

from tf_free import FreeAdversarialModel, PGDAdversarialModel


def reference_free(base, batches, *, epsilon, replays, step_size, warm_start=True):
    """Alg. 2 with plain GradientTapes and a hand-written SGD with momentum."""
    weights = [tf.Variable(w) for w in base.trainable_weights]
    velocity = [tf.zeros_like(w) for w in weights]
    capacity = len(batches[0][1])
    delta = tf.zeros((capacity, *IMAGE_SHAPE))
    losses = []
    for x, y in batches:
        x = tf.constant(x)
        n = len(y)
        if not warm_start:
            delta = tf.zeros_like(delta)
        for _ in range(replays):
            d = delta[:n]
            with tf.GradientTape() as tape:
                tape.watch(d)
                logits = base(tf.clip_by_value(x + d, 0.0, 1.0))
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads, d_grad = tape.gradient(loss, [base.trainable_weights, d])
            # Keras SGD: v <- momentum * v - lr * g; w <- w + v.
            velocity = [MOMENTUM * v - LR * g for v, g in zip(velocity, grads)]
            for w, v in zip(base.trainable_weights, velocity):
                w.assign_add(v)
            d = tf.clip_by_value(d + step_size * tf.sign(d_grad), -epsilon, epsilon)
            d = tf.clip_by_value(x + d, 0.0, 1.0) - x
            delta = tf.concat([d, delta[n:]], axis=0)
            losses.append(float(loss))
    del weights
    return [w.numpy() for w in base.trainable_weights], delta.numpy(), losses


def train_free(batches, *, epsilon=EPSILON, replays=3, step_size=None, jit_compile=False):
    model = FreeAdversarialModel(make_base(), epsilon=epsilon, replays=replays, step_size=step_size)
    compile_model(model, jit_compile)
    history = model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    return model, history


@pytest.mark.parametrize("sizes", [(16, 16), (16, 16, 6)], ids=["two_batches", "short_last"])
def test_fit_matches_handwritten_alg2(sizes):
    batches = make_batches(sizes)
    model, _ = train_free(batches, replays=3)
    ref_weights, ref_delta, _ = reference_free(
        make_base(), batches, epsilon=EPSILON, replays=3, step_size=EPSILON
    )
    for got, want in zip(model.get_weights(), ref_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.perturbation.numpy(), ref_delta, rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations) == 3 * len(sizes)  # one step per replay
    assert np.abs(ref_delta).max() > 0.5 * EPSILON  # δ actually moved


def test_delta_is_warm_started_not_reset():
    batches = make_batches((16, 16))
    model, _ = train_free(batches)
    _, reset_delta, _ = reference_free(
        make_base(), batches, epsilon=EPSILON, replays=3, step_size=EPSILON, warm_start=False
    )
    _, warm_delta, _ = reference_free(
        make_base(), batches, epsilon=EPSILON, replays=3, step_size=EPSILON
    )
    assert not np.allclose(reset_delta, warm_delta)
    np.testing.assert_allclose(model.perturbation.numpy(), warm_delta, rtol=1e-5, atol=1e-6)


def test_delta_stays_in_eps_ball_and_image_box():
    batches = make_batches((16, 16, 16), seed=3)
    # A large step pushes δ against both constraints.
    model, _ = train_free(batches, epsilon=0.3, replays=4, step_size=0.25)
    delta = model.perturbation.numpy()
    assert np.abs(delta).max() <= 0.3 + 1e-6
    x_last = batches[-1][0]
    assert (x_last + delta).min() >= -1e-6 and (x_last + delta).max() <= 1 + 1e-6
    assert np.isclose(np.abs(delta).max(), 0.3, atol=1e-6)  # the ball's edge is reached


def test_reported_loss_is_the_mean_of_last_replays():
    batches = make_batches((16, 16))
    _, history = train_free(batches, replays=2)
    _, _, ref_losses = reference_free(
        make_base(), batches, epsilon=EPSILON, replays=2, step_size=EPSILON
    )
    # Keras averages the per-batch loss over the epoch, weighted by batch size;
    # each batch reports its last replay.
    np.testing.assert_allclose(history.history["loss"][0], np.mean(ref_losses[1::2]), rtol=1e-5)


def test_epsilon_zero_is_natural_training_with_replay():
    batches = make_batches((16, 16))
    free, _ = train_free(batches, epsilon=0.0, replays=3)
    natural = compile_model(make_base())
    replayed = [b for b in batches for _ in range(3)]
    natural.fit(as_dataset(replayed), epochs=1, verbose=0, shuffle=False)
    for got, want in zip(free.get_weights(), natural.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(free.perturbation.numpy())


def test_xla_matches_no_xla():
    batches = make_batches((16, 16, 6))
    eager_graph, h1 = train_free(batches, jit_compile=False)
    xla, h2 = train_free(batches, jit_compile=True)
    assert xla.jit_compile
    for got, want in zip(xla.get_weights(), eager_graph.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        xla.perturbation.numpy(), eager_graph.perturbation.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5)


def test_mirrored_two_replicas_match_one_device():
    batches = make_batches((16, 16))
    single, single_history = train_free(batches)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        model = FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=3)
        compile_model(model)
    history = model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    for got, want in zip(model.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"], single_history.history["loss"], rtol=1e-5)
    # Each replica keeps its own δ for its half of the global batch.
    per_replica = [d.numpy() for d in strategy.experimental_local_results(model.perturbation)]
    assert [d.shape[0] for d in per_replica] == [8, 8]
    np.testing.assert_allclose(
        np.concatenate(per_replica), single.perturbation.numpy(), rtol=1e-5, atol=1e-6
    )


def test_pgd_model_matches_handwritten_alg1():
    ((x, y),) = make_batches((16,))
    model = PGDAdversarialModel(
        make_base(), epsilon=EPSILON, steps=3, step_size=0.04, random_start=False
    )
    compile_model(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    base = make_base()
    # K-step PGD (no random start) with plain tapes, then one SGD step.
    adv = tf.constant(x)
    best = adv
    for _ in range(3):
        with tf.GradientTape() as tape:
            tape.watch(adv)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=base(adv))
            )
        adv = tf.clip_by_value(
            adv + 0.04 * tf.sign(tape.gradient(loss, adv)), x - EPSILON, x + EPSILON
        )
        adv = tf.clip_by_value(adv, 0.0, 1.0)
    best = adv
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=base(best))
        )
    grads = tape.gradient(loss, base.trainable_weights)
    for w, g in zip(base.trainable_weights, grads):
        w.assign_sub(LR * g)
    # The training attack is pgd(select="last"): the K-th iterate, as Madry's.
    for got, want in zip(model.get_weights(), base.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epsilon=-0.1, replays=2), "epsilon"),
        (dict(epsilon=0.1, replays=0), "replays"),
        (dict(epsilon=0.1, replays=2.5), "replays"),
        (dict(epsilon=0.1, replays=2, step_size=0.0), "step_size"),
        (dict(epsilon=0.1, replays=2, clip_min=1.0, clip_max=0.0), "clip_min"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreeAdversarialModel(make_base(), **kwargs)


def test_larger_batch_than_delta_is_a_clear_error():
    batches = make_batches((8, 8))
    model, _ = train_free(batches)
    before = model.perturbation.numpy().copy()
    with pytest.raises(ValueError, match="cannot take per-replica batches"):
        model.fit(as_dataset(make_batches((16, 16))), epochs=1, verbose=0)
    np.testing.assert_array_equal(model.perturbation.numpy(), before)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_delta_stays_finite_even_on_overflow(policy):
    batches = make_batches((16, 16))
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=3)
        optimizer = keras.optimizers.SGD(LR)
        if policy == "mixed_float16":
            # A loss scale of 2^28 overflows float16 gradients on the first
            # replays: the optimizer skips those steps; δ must not turn NaN.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**28)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(as_dataset(batches), epochs=4, verbose=0, shuffle=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    delta = model.perturbation.numpy()
    assert np.isfinite(delta).all()
    assert np.abs(delta).max() <= EPSILON + 1e-6
    assert np.abs(delta).max() > 0.5 * EPSILON  # finite steps still move δ
    assert all(np.isfinite(w).all() for w in model.get_weights())
    if policy == "mixed_float16":
        assert float(model.optimizer.dynamic_scale) < 2.0**28  # overflow happened and was handled


class _Batches(keras.utils.PyDataset):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def _inputs(kind, batches):
    """fit's arguments for `batches` given as `kind`, and the rows of δ fit must make."""
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    if kind == "arrays":
        return dict(x=x, y=y, batch_size=16, shuffle=False), 16
    if kind == "arrays_default_batch":  # Keras's default batch of 32
        return dict(x=x, y=y, shuffle=False), 32
    if kind == "arrays_steps":  # no batch_size: ceil(40 / 3) rows
        return dict(x=x, y=y, steps_per_epoch=3, shuffle=False), 14
    if kind == "arrays_validation_split":  # 40 × (1 - 0.5) rows left, fewer than the batch
        return dict(x=x, y=y, batch_size=32, validation_split=0.5, shuffle=False), 20
    if kind == "dataset":
        return dict(x=as_dataset(batches)), 16
    if kind == "generator":
        return dict(x=(b for b in batches)), 16
    return dict(x=_Batches(batches), shuffle=False), 16


@pytest.mark.parametrize(
    "kind",
    [
        "arrays",
        "arrays_default_batch",
        "arrays_steps",
        "arrays_validation_split",
        "dataset",
        "generator",
        "py_dataset",
    ],
)
def test_fit_sizes_delta_from_the_first_batch_of_any_input(kind):
    batches = make_batches((16, 16, 8))
    kwargs, rows = _inputs(kind, batches)
    model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    assert model.perturbation is None
    model.fit(epochs=1, verbose=0, **kwargs)
    assert model.perturbation.shape == (rows, *IMAGE_SHAPE)
    if kind in ("dataset", "py_dataset"):
        # Every batch is trained on, the one fit peeked at included.
        reference, _ = train_free(batches, replays=2)
        assert int(model.optimizer.iterations) == 2 * len(batches)
        for got, want in zip(model.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(got, want)
    if kind == "generator":
        # The batch fit peeked at is put back: as many steps as a plain Keras
        # model takes on the same generator (Keras 3.15 takes 4 on these 3).
        plain = compile_model(make_base())
        plain.fit((b for b in batches), epochs=1, verbose=0)
        assert int(model.optimizer.iterations) == 2 * int(plain.optimizer.iterations)


def test_train_on_batch_sizes_delta_and_trains_as_fit():
    ((x, y),) = make_batches((16,))
    model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=3))
    model.train_on_batch(x, y)
    fitted, _ = train_free([(x, y)])
    assert model.perturbation.shape == (16, *IMAGE_SHAPE)
    np.testing.assert_array_equal(model.perturbation.numpy(), fitted.perturbation.numpy())
    for got, want in zip(model.get_weights(), fitted.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_fit_on_an_input_of_unknown_shape_asks_for_build_perturbation():
    model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    with pytest.raises(ValueError, match=r"call build_perturbation\(\(per-replica batch"):
        model.fit(object(), epochs=1, verbose=0)
    assert model.perturbation is None


def test_fit_on_arrays_sizes_delta_per_replica_under_two_replicas():
    batches = make_batches((16, 16, 8))
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        model = compile_model(FreeAdversarialModel(make_base(), epsilon=EPSILON, replays=2))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    # Each replica takes half of the global batch of 16, and holds δ for it.
    per_replica = strategy.experimental_local_results(model.perturbation)
    assert [d.shape for d in per_replica] == [(8, *IMAGE_SHAPE)] * 2
