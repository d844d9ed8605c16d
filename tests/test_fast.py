"""FastAdversarialModel (FGSM-RS) against a hand-written step with plain GradientTapes."""

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

from tf_free.fast import FastAdversarialModel

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _reference(batches, *, epsilon, step_size, init, seed=0):
    """locuslab/fast_adversarial train_fgsm.py L97-115, written out with tapes and SGD.

    Returns the weights and each batch's final δ.
    """
    model = make_base()
    velocity = [np.zeros_like(w) for w in model.get_weights()]
    previous = None
    deltas = []
    for iteration, (x, y) in enumerate(batches):
        x = tf.constant(x)
        if init == "zero":
            delta = tf.zeros_like(x)
        elif init == "previous":
            delta = tf.zeros_like(x) if previous is None else previous[: len(y)]
        else:
            noise = tf.random.stateless_uniform(
                x.shape, seed=[seed, iteration], minval=-epsilon, maxval=epsilon
            )
            delta = tf.clip_by_value(x + noise, 0.0, 1.0) - x
        with tf.GradientTape() as tape:
            tape.watch(delta)
            loss = CE(y, model(x + delta, training=True))
        gradient = tape.gradient(loss, delta)
        delta = tf.clip_by_value(delta + step_size * tf.sign(gradient), -epsilon, epsilon)
        delta = tf.clip_by_value(x + delta, 0.0, 1.0) - x
        with tf.GradientTape() as tape:
            loss = CE(y, model(x + delta, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        # Keras SGD with momentum: v ← μv − lr·g; w ← w + v.
        for i, (w, g) in enumerate(zip(model.trainable_variables, grads)):
            velocity[i] = MOMENTUM * velocity[i] - LR * g.numpy()
            w.assign(w.numpy() + velocity[i])
        previous = delta
        deltas.append(delta.numpy())
    return model.get_weights(), deltas


def _fit(batches, strategy=None, **kwargs):
    with (strategy or tf.distribute.get_strategy()).scope():
        model = compile_model(FastAdversarialModel(make_base(), epsilon=EPSILON, **kwargs))
    model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    return model


@pytest.mark.parametrize("init", ["random", "zero", "previous"])
def test_fit_matches_the_hand_written_step(init):
    batches = make_batches((16, 16, 16))
    model = _fit(batches, init=init)
    want_weights, want_deltas = _reference(
        batches, epsilon=EPSILON, step_size=1.25 * EPSILON, init=init
    )
    for got, want in zip(model.get_weights(), want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The last δ is kept (for "previous", and for TensorBoard's statistics).
    np.testing.assert_allclose(model.perturbation.numpy(), want_deltas[-1], atol=1e-6)
    assert int(model.optimizer.iterations) == 3  # one iteration per batch


def test_the_step_size_defaults_to_1_25_epsilon():
    model = FastAdversarialModel(make_base(), epsilon=8 / 255)
    assert model.step_size == pytest.approx(10 / 255)  # the paper's α=10/255 at ε=8/255
    assert FastAdversarialModel(make_base(), epsilon=0.1, step_size=0.05).step_size == 0.05


@pytest.mark.parametrize("init", ["random", "previous"])
def test_delta_stays_in_the_ball_and_images_stay_valid(init):
    rng = np.random.default_rng(0)
    # Images at the ends of the range, where a random start must be clamped.
    x = rng.choice([0.0, 0.02, 0.98, 1.0], size=(4 * 16, *IMAGE_SHAPE)).astype("float32")
    y = rng.integers(0, 3, 4 * 16)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = _fit(batches, init=init, step_size=3 * EPSILON)  # a step that overshoots
    delta = model.perturbation.numpy()
    assert np.abs(delta).max() <= EPSILON + 1e-6
    last = batches[-1][0]
    assert (last + delta >= -1e-6).all() and (last + delta <= 1 + 1e-6).all()
    assert np.isclose(np.abs(delta), EPSILON).mean() > 0.2  # the FGSM step reached ±ε


def test_zero_start_with_step_epsilon_is_fgsm_training():
    """init="zero", α=ε: δ = ε·sign(∇δ) kept valid, i.e. FGSM from the clean image."""
    from tf_free import attacks

    batches = make_batches((16,))
    model = compile_model(
        FastAdversarialModel(make_base(), epsilon=EPSILON, step_size=EPSILON, init="zero")
    )
    before = make_base()  # the weights the step starts from
    x, y = batches[0]
    adversarial = attacks.fgsm(before, tf.constant(x), tf.constant(y), epsilon=EPSILON)
    model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(model.perturbation.numpy(), adversarial.numpy() - x, atol=1e-6)


def test_two_replicas_match_one_device():
    """The random start is the global batch's draw, sliced per replica."""
    batches = make_batches((16, 16))
    single = _fit(batches)
    mirrored = _fit(batches, tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
    for got, want in zip(mirrored.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got = np.concatenate(
        [
            v.numpy()
            for v in mirrored.distribute_strategy.experimental_local_results(mirrored.perturbation)
        ]
    )
    np.testing.assert_allclose(got, single.perturbation.numpy(), atol=1e-6)


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="init must be one of"):
        FastAdversarialModel(make_base(), epsilon=EPSILON, init="gaussian")


def test_config_round_trip():
    model = FastAdversarialModel(make_base(), epsilon=EPSILON, init="previous", seed=3)
    clone = FastAdversarialModel.from_config(model.get_config())
    assert (clone.epsilon, clone.step_size, clone.init, clone.seed, clone.replays) == (
        EPSILON,
        1.25 * EPSILON,
        "previous",
        3,
        1,
    )


@pytest.mark.parametrize(
    "jit_compile, init",
    [
        # XLA of the whole step derives the random start's key its own way (a
        # seed computed at run time): compared from the zero start.
        (True, "zero"),
        # Per replica, the start is drawn outside XLA: the same draw.
        ("per_replica", "random"),
    ],
)
def test_xla_matches_no_xla(jit_compile, init):
    batches = make_batches((16, 16))
    plain = _fit(batches, init=init)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]) if jit_compile != True else None  # noqa: E712
    with (strategy or tf.distribute.get_strategy()).scope():
        model = compile_model(
            FastAdversarialModel(make_base(), epsilon=EPSILON, init=init), jit_compile
        )
    model.fit(as_dataset(batches), epochs=1, verbose=0, shuffle=False)
    assert model.uses_xla()
    for got, want in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mixed_precision_trains_in_the_ball():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        batches = make_batches((16, 16))
        model = _fit(batches)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    delta = model.perturbation.numpy()
    assert delta.dtype == np.float32 and np.isfinite(delta).all()
    assert np.abs(delta).max() <= EPSILON + 1e-6
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_the_application_builds_fast_training_with_its_flags():
    from tf_free import experiment, run_folder
    from tf_free.config import TrainConfig, effective_settings

    config = TrainConfig(method="fast", epsilon=8.0, fast_init="previous", seed=5)
    info = experiment.dataset_info(config)
    model, _ = experiment.build_model(config, info)
    assert isinstance(model, FastAdversarialModel)
    assert model.step_size == pytest.approx(10 / 255) and model.init == "previous"
    assert model.seed == 5 and config.replays == 1 and config.passes == 8
    assert run_folder.label(config) == "fast (previous start)"
    settings = effective_settings(config)
    assert settings["fast_step_size"] == 10.0 and "m" not in settings
    assert "fast_init" not in effective_settings(TrainConfig(method="free"))
