"""Tests for tf_free.attacks: FGSM, PGD (CE/CW, restarts), accuracy_under_attack.

Every check compares against a reference computed independently in the test
(numpy argmax accuracies, closed-form losses and gradients, a hand-written PGD
loop) on a tiny CNN trained for a second on synthetic but learnable data.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_free.attacks import accuracy_under_attack, cw_loss, fgsm, pgd

NUM_CLASSES = 3
EPS = 0.15  # large enough that a trained model loses most of its accuracy
STEP = EPS / 4
# The three regions of an 8x8 image whose brightness decides the class.
REGIONS = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 8))]


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-noise 8x8x1 images; class c has region c brightened by 0.3."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, NUM_CLASSES, size=n).astype(np.int32)
    images = rng.uniform(0, 1, size=(n, 8, 8, 1)).astype(np.float32)
    for i, label in enumerate(labels):
        rows, cols = REGIONS[label]
        images[i, rows, cols, 0] = np.clip(images[i, rows, cols, 0] + 0.3, 0, 1)
    # Saturated pixels, so the [0, 1] clip of the attacks is exercised.
    images[:, 0, 0, 0] = 0.0
    images[:, 7, 7, 0] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    x, y = make_data(512, seed=0)
    net = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    net.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    net.fit(x, y, batch_size=64, epochs=10, verbose=0)
    return net


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data(128, seed=1)


def np_accuracy(model, images, labels) -> float:
    """Top-1 accuracy computed with numpy argmax, independently of attacks.py."""
    logits = np.asarray(model(tf.constant(images)))
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def np_fooled(model, images, labels) -> np.ndarray:
    logits = np.asarray(model(tf.constant(images)))
    return np.argmax(logits, axis=-1) != np.asarray(labels)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_cw(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """max_{j != y} z_j - z_y, by explicit deletion of the true class."""
    out = []
    for z, y in zip(logits, labels, strict=True):
        out.append(np.max(np.delete(z, y)) - z[y])
    return np.array(out)


def np_ce(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


# 1. ε = 0 gives the clean accuracy.


def test_zero_epsilon_gives_clean_accuracy(model, data):
    x, y = data
    # Relabel some examples at random, so clean accuracy is far from 0 and 1
    # and a wrong count cannot go unnoticed.
    rng = np.random.RandomState(2)
    y = y.copy()
    noisy = rng.rand(len(y)) < 0.3
    y[noisy] = rng.randint(0, NUM_CLASSES, size=noisy.sum())
    # Batches of 48 over 128 examples: the last batch is partial.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(48)

    expected = np_accuracy(model, x, y)
    assert 0.5 < expected < 0.9
    clean = accuracy_under_attack(model, ds, verbose=False)
    zero_pgd = accuracy_under_attack(
        model, ds, pgd, epsilon=0.0, step_size=0.05, steps=3, restarts=2, verbose=False
    )
    zero_pgd_cw = accuracy_under_attack(
        model, ds, pgd, epsilon=0, step_size=0.05, steps=3, loss="cw", verbose=False
    )
    zero_fgsm = accuracy_under_attack(model, ds, fgsm, epsilon=0.0, verbose=False)
    assert clean == pytest.approx(expected, abs=1e-12)
    assert zero_pgd == pytest.approx(expected, abs=1e-12)
    assert zero_pgd_cw == pytest.approx(expected, abs=1e-12)
    assert zero_fgsm == pytest.approx(expected, abs=1e-12)

    # num_examples keeps the first examples only.
    first = accuracy_under_attack(model, ds, num_examples=50, verbose=False)
    assert first == pytest.approx(np_accuracy(model, x[:50], y[:50]), abs=1e-12)


def test_accuracy_under_attack_matches_attack_then_argmax(model, data):
    x, y = data
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    kwargs = dict(epsilon=EPS, step_size=STEP, steps=5, seed=3)
    robust = accuracy_under_attack(model, ds, pgd, verbose=False, **kwargs)
    expected = np_accuracy(model, pgd(model, x, y, **kwargs), y)
    assert robust == pytest.approx(expected, abs=1e-12)
    assert robust < np_accuracy(model, x, y) - 0.2


def test_empty_dataset_raises(model):
    ds = tf.data.Dataset.from_tensor_slices(
        (np.zeros((0, 8, 8, 1), np.float32), np.zeros((0,), np.int32))
    ).batch(4)
    with pytest.raises(ValueError, match="empty"):
        accuracy_under_attack(model, ds, verbose=False)


# 2. Outputs stay in the ε-ball and in [0, 1].

BALL_CASES = [
    pytest.param(fgsm, dict(loss="ce"), id="fgsm-ce"),
    pytest.param(fgsm, dict(loss="cw"), id="fgsm-cw"),
    # step_size > ε, so an attack without projection would leave the ball.
    pytest.param(pgd, dict(loss="ce", step_size=2.5 * EPS, steps=4, restarts=2), id="pgd-ce"),
    pytest.param(pgd, dict(loss="cw", step_size=2.5 * EPS, steps=4, restarts=3), id="pgd-cw"),
    pytest.param(
        pgd, dict(loss="cw", step_size=STEP, steps=3, restarts=2, seed=7), id="pgd-cw-small"
    ),
]


@pytest.mark.parametrize("attack,kwargs", BALL_CASES)
def test_output_in_epsilon_ball_and_box(model, data, attack, kwargs):
    x, y = data
    adv = attack(model, x, y, epsilon=EPS, **kwargs)
    assert adv.shape == x.shape
    assert adv.dtype == tf.float32
    adv = np.asarray(adv)
    delta = np.abs(adv - x)
    assert delta.max() <= EPS + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    # Not vacuous: the attack uses its budget (with steps of at least ε, most
    # pixels end on the boundary of the ball).
    assert delta.max() == pytest.approx(EPS, abs=1e-6)
    if kwargs.get("step_size", EPS) >= EPS:
        assert np.mean(np.isclose(delta, EPS, atol=1e-6)) > 0.5
    # The saturated pixels stay in range instead of being pushed outside it.
    assert np.all(adv[:, 0, 0, 0] <= EPS + 1e-6)
    assert np.all(adv[:, 7, 7, 0] >= 1 - EPS - 1e-6)


def test_output_in_ball_with_custom_pixel_range(model, data):
    x, y = data
    lo, hi = 0.2, 0.8
    x = np.clip(x, lo, hi)
    for adv in (
        fgsm(model, x, y, epsilon=EPS, clip_min=lo, clip_max=hi),
        pgd(model, x, y, epsilon=EPS, step_size=EPS, steps=3, restarts=2, clip_min=lo, clip_max=hi),
    ):
        adv = np.asarray(adv)
        assert np.abs(adv - x).max() <= EPS + 1e-6
        assert adv.min() >= lo and adv.max() <= hi
        assert adv.min() == pytest.approx(lo) and adv.max() == pytest.approx(hi)


# FGSM against closed-form gradients of a linear model (a plain callable).


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_fgsm_matches_closed_form_on_linear_callable(data, loss):
    x, y = data
    rng = np.random.RandomState(4)
    w = rng.normal(size=(64, NUM_CLASSES)).astype(np.float32)
    b = rng.normal(size=NUM_CLASSES).astype(np.float32)
    w_tf, b_tf = tf.constant(w), tf.constant(b)

    def linear(images):  # a plain function, not a Keras model
        return tf.reshape(images, [-1, 64]) @ w_tf + b_tf

    z = x.reshape(-1, 64) @ w + b
    if loss == "ce":
        # ∂CE/∂x = W (softmax(z) - onehot(y)).
        grad = (np_softmax(z) - np.eye(NUM_CLASSES)[y]) @ w.T
    else:
        # ∂(z_j* - z_y)/∂x = w_j* - w_y, j* the best wrong class.
        masked = np.where(np.eye(NUM_CLASSES)[y] > 0, -np.inf, z)
        grad = w[:, masked.argmax(-1)].T - w[:, y].T
    expected = np.clip(x + EPS * np.sign(grad).reshape(x.shape), 0, 1)
    adv = np.asarray(fgsm(linear, x, y, epsilon=EPS, loss=loss))
    np.testing.assert_allclose(adv, expected, atol=1e-6)
    # Not vacuous: FGSM fools a good share of the examples of this random model.
    assert np.mean(np_fooled(linear, adv, y)) > np.mean(np_fooled(linear, x, y))


# 3. More steps or restarts never raise robust accuracy.


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_more_steps_never_raise_robust_accuracy(model, data, loss):
    x, y = data
    clean = np_accuracy(model, x, y)
    fooled_sets, accs = [], []
    for steps in (1, 2, 5, 10, 20):
        adv = pgd(model, x, y, epsilon=EPS, step_size=STEP, steps=steps, loss=loss, seed=1)
        fooled = np_fooled(model, adv, y)
        fooled_sets.append(fooled)
        accs.append(1 - fooled.mean())
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
    # Per example: once fooled with k steps, fooled with more steps.
    for fewer, more in zip(fooled_sets, fooled_sets[1:], strict=False):
        assert np.all(more[fewer])
    # Not vacuous: the attack gets stronger with steps and ends well below clean.
    assert accs[-1] < accs[0] - 0.2
    assert accs[-1] < clean - 0.4, (clean, accs)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_more_restarts_never_raise_robust_accuracy(model, data, loss):
    x, y = data
    fooled_sets = []
    for restarts in (1, 3, 6):
        adv = pgd(
            model, x, y, epsilon=EPS, step_size=STEP, steps=3, restarts=restarts, loss=loss, seed=5
        )
        fooled_sets.append(np_fooled(model, adv, y))
    accs = [1 - f.mean() for f in fooled_sets]
    assert accs[0] >= accs[1] >= accs[2], accs
    for fewer, more in zip(fooled_sets, fooled_sets[1:], strict=False):
        assert np.all(more[fewer])
    # Not vacuous: with 3 short steps, extra restarts do find more examples.
    assert accs[2] < accs[0]
    assert accs[2] < np_accuracy(model, x, y) - 0.2


def test_pgd_is_reproducible_and_seed_dependent(model, data):
    x, y = data
    kwargs = dict(epsilon=EPS, step_size=STEP, steps=2)
    a = np.asarray(pgd(model, x, y, seed=11, **kwargs))
    b = np.asarray(pgd(model, x, y, seed=11, **kwargs))
    c = np.asarray(pgd(model, x, y, seed=12, **kwargs))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.01


# 4. PGD-1 with step ε and no random start is FGSM.


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("restarts", [1, 2])
def test_pgd_one_step_equals_fgsm(model, data, loss, restarts):
    x, y = data
    expected = np.asarray(fgsm(model, x, y, epsilon=EPS, loss=loss))
    adv = pgd(
        model,
        x,
        y,
        epsilon=EPS,
        step_size=EPS,
        steps=1,
        restarts=restarts,
        loss=loss,
        random_start=False,
    )
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=0, atol=1e-7)
    # Not vacuous: FGSM moved the images.
    assert np.abs(expected - x).max() > EPS / 2


# 5. CW loss against its closed form.


def test_cw_loss_closed_form():
    logits = np.array(
        [
            [1.0, 2.0, 3.0],  # true class is the min
            [5.0, 2.0, 3.0],  # true class is the max
            [-3.0, -2.0, -7.0],  # all negative, true class not the max
            [-1.0, -5.0, -9.0],  # all negative, true class is the max
            [2.0, 2.0, 0.0],  # tie between the true class and another
            [0.0, 4.0, 4.0],  # tie between two wrong classes
            [1.5, 1.5, 1.5],  # all equal
            [-100.0, -200.0, 50.0],  # larger magnitudes
            [0.0, 0.0, 0.0],
        ],
        np.float32,
    )
    labels = np.array([0, 0, 0, 0, 0, 0, 2, 2, 1])
    expected = np_cw(labels, logits)
    np.testing.assert_allclose(expected, [2, -2, 1, -4, 0, 4, 0, -150, 0])  # hand check
    got = np.asarray(cw_loss(tf.constant(labels), tf.constant(logits)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_cw_loss_random_logits_and_dtypes():
    rng = np.random.RandomState(6)
    logits = rng.normal(scale=10, size=(200, 10)).astype(np.float32)
    labels = rng.randint(0, 10, size=200)
    expected = np_cw(labels, logits)
    for lab in (labels.astype(np.int32), labels.astype(np.int64)):
        for z in (logits, logits.astype(np.float16)):
            ref = np_cw(lab, z.astype(np.float32))
            got = np.asarray(cw_loss(tf.constant(lab), tf.constant(z)))
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    got = np.asarray(cw_loss(tf.constant(labels), tf.constant(logits)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    # Sign of the margin is the misclassification indicator (no ties here).
    np.testing.assert_array_equal(got > 0, np.argmax(logits, -1) != labels)


@pytest.mark.parametrize(
    "logits",
    [
        [[-1e10, -2e10, -3e10], [3e9, 0.0, -1.0]],  # |z| > 1e9
        [[1.0, -np.inf, 0.0], [2.0, 1.0, -np.inf]],  # a masked-out wrong class
    ],
    ids=["huge", "minus-inf"],
)
def test_cw_loss_extreme_logits(logits):
    logits = np.array(logits, np.float32)
    labels = np.array([0, 0])
    got = np.asarray(cw_loss(tf.constant(labels), tf.constant(logits)))
    np.testing.assert_allclose(got, np_cw(labels, logits), rtol=1e-6)


def test_cross_entropy_attack_loss_closed_form():
    from tf_free.attacks import cross_entropy_loss

    rng = np.random.RandomState(8)
    logits = rng.normal(scale=5, size=(50, 4)).astype(np.float32)
    labels = rng.randint(0, 4, size=50)
    got = np.asarray(cross_entropy_loss(tf.constant(labels), tf.constant(logits)))
    np.testing.assert_allclose(got, np_ce(labels, logits.astype(np.float64)), rtol=1e-5, atol=1e-5)


# 6a. PGD keeps, per example, the strongest iterate over all steps and restarts.


def reference_pgd_iterates(model, x, y, *, epsilon, step_size, steps, restarts, loss, seed):
    """Every PGD iterate (steps 1..K of every restart), by a hand-written loop.

    Returns arrays [restarts * steps, N, ...] of images, fooled flags and losses.
    """
    loss_np = np_ce if loss == "ce" else np_cw
    iterates, fooled, losses = [], [], []
    for r in range(restarts):
        noise = tf.random.stateless_uniform(
            x.shape, seed=tf.constant([seed, r], tf.int64), minval=-epsilon, maxval=epsilon
        )
        adv = np.clip(np.clip(x + noise.numpy(), x - epsilon, x + epsilon), 0, 1)
        for _ in range(steps):
            adv_tf = tf.constant(adv)
            with tf.GradientTape() as tape:
                tape.watch(adv_tf)
                logits = model(adv_tf)
                total = tf.reduce_sum(
                    cw_loss(y, logits)
                    if loss == "cw"
                    else tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grad = tape.gradient(total, adv_tf).numpy()
            adv = np.clip(np.clip(adv + step_size * np.sign(grad), x - epsilon, x + epsilon), 0, 1)
            adv = adv.astype(np.float32)
            z = np.asarray(model(tf.constant(adv)), np.float64)
            iterates.append(adv)
            fooled.append(np.argmax(z, -1) != y)
            losses.append(loss_np(y, z))
    return np.stack(iterates), np.stack(fooled), np.stack(losses)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_keeps_strongest_iterate(model, data, loss):
    x, y = data
    kwargs = dict(epsilon=EPS, step_size=STEP, steps=4, restarts=3, loss=loss, seed=9)
    iterates, fooled, losses = reference_pgd_iterates(model, x, y, **kwargs)
    adv = np.asarray(pgd(model, x, y, **kwargs))

    any_fooled = fooled.any(axis=0)
    got_fooled = np_fooled(model, adv, y)
    np.testing.assert_array_equal(got_fooled, any_fooled)
    # Not vacuous: the selection matters, i.e. the union over all iterates fools
    # more examples than the last iterate of any single restart does.
    last_iterates = fooled[kwargs["steps"] - 1 :: kwargs["steps"]]
    assert any_fooled.sum() > last_iterates.sum(axis=1).max()
    assert 0 < any_fooled.sum() < len(y)

    # The result is one of the iterates, per example.
    dist = np.abs(iterates - adv[None]).reshape(len(iterates), len(y), -1).max(-1)
    assert np.all(dist.min(axis=0) <= 1e-6)
    # Where none fools, it is the highest-loss iterate.
    z = np.asarray(model(tf.constant(adv)), np.float64)
    got_loss = (np_ce if loss == "ce" else np_cw)(y, z)
    unfooled = ~any_fooled
    np.testing.assert_allclose(
        got_loss[unfooled], losses.max(axis=0)[unfooled], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_fools_whenever_fgsm_or_single_restart_does(model, data, loss):
    x, y = data
    fgsm_fooled = np_fooled(model, fgsm(model, x, y, epsilon=EPS, loss=loss), y)
    # With step ε and no random start, FGSM is PGD's first iterate.
    adv = pgd(model, x, y, epsilon=EPS, step_size=EPS, steps=5, loss=loss, random_start=False)
    assert np.all(np_fooled(model, adv, y)[fgsm_fooled])
    assert fgsm_fooled.any()

    # Restarts=3 with seed s fools whatever its first restart (seed s) fools.
    kwargs = dict(epsilon=EPS, step_size=STEP, steps=2, loss=loss)
    single = np_fooled(model, pgd(model, x, y, restarts=1, seed=4, **kwargs), y)
    multi = np_fooled(model, pgd(model, x, y, restarts=3, seed=4, **kwargs), y)
    assert single.any()
    assert np.all(multi[single])


def one_pixel_model(logit_fns):
    """A plain callable on [N, 1, 1, 1] images whose logits are given functions of the pixel."""

    def model(images):
        u = tf.reshape(images, [-1])
        return tf.stack([fn(u) for fn in logit_fns], axis=-1)

    return model


def test_selection_prefers_fooling_over_loss_on_handmade_landscape():
    # 10 classes, label 0. At u = 0.5 the model is right but unsure (CE 2.21);
    # the CE gradient points up, and at u = 1 class 1 wins (fooled) with a lower
    # CE (1.31); there the gradient points back down, so PGD's second iterate is
    # u = 0.5 again. The fooling iterate must be kept although its CE is lower.
    def a(u):
        return -0.1 + 6 * (u - 0.5) - 7.6 * (u - 0.5) ** 2

    def b(u):
        return -0.1 - 40 * (u - 0.5) ** 2

    model = one_pixel_model([tf.zeros_like, a] + [b] * 8)
    x = np.full((1, 1, 1, 1), 0.5, np.float32)
    y = np.array([0], np.int32)
    # Premises of the landscape, checked in numpy.
    z = {u: np.array([0, a(u)] + [b(u)] * 8) for u in (0.5, 1.0)}
    assert np.argmax(z[0.5]) == 0 and np.argmax(z[1.0]) == 1
    assert np_ce(y, z[0.5][None])[0] > np_ce(y, z[1.0][None])[0] + 0.5

    adv = fgsm(model, x, y, epsilon=0.5)
    np.testing.assert_allclose(np.asarray(adv), 1.0)
    adv = pgd(model, x, y, epsilon=0.5, step_size=0.5, steps=2, random_start=False)
    np.testing.assert_allclose(np.asarray(adv), 1.0)
    assert np_fooled(model, adv, y)[0]


def test_start_point_is_not_a_candidate_on_handmade_landscape():
    # 3 classes, label 0, never fooled. The CE gradient at u = 0.5 points up, but
    # the step of ε overshoots the peak of logit 1 at u = 0.6 to a lower loss.
    # PGD-1 must still return the FGSM point, not the higher-loss start.
    def a(u):
        return -1 - 10 * (u - 0.6) ** 2

    model = one_pixel_model([tf.zeros_like, a, lambda u: tf.fill(tf.shape(u), -5.0)])
    x = np.full((1, 1, 1, 1), 0.5, np.float32)
    y = np.array([0], np.int32)
    z = {u: np.array([[0, a(u), -5.0]]) for u in (0.5, 1.0)}
    assert np_ce(y, z[0.5])[0] > np_ce(y, z[1.0])[0]

    expected = np.asarray(fgsm(model, x, y, epsilon=0.5))
    np.testing.assert_allclose(expected, 1.0)
    adv = pgd(model, x, y, epsilon=0.5, step_size=0.5, steps=1, random_start=False)
    np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-7)


# 6b. Bad arguments.


@pytest.mark.parametrize(
    "attack,kwargs,message",
    [
        (fgsm, dict(epsilon=-0.1), "epsilon must be >= 0"),
        (fgsm, dict(epsilon=0.1, loss="foo"), "loss must be one of"),
        (pgd, dict(epsilon=-0.1, step_size=0.01, steps=3), "epsilon must be >= 0"),
        (pgd, dict(epsilon=0.1, step_size=-0.01, steps=3), "step_size must be >= 0"),
        (pgd, dict(epsilon=0.1, step_size=0.01, steps=0), "steps must be an integer >= 1"),
        (pgd, dict(epsilon=0.1, step_size=0.01, steps=2.5), "steps must be an integer >= 1"),
        (pgd, dict(epsilon=0.1, step_size=0.01, steps=3, restarts=0), "restarts must be"),
        (pgd, dict(epsilon=0.1, step_size=0.01, steps=3, loss="foo"), "loss must be one of"),
    ],
)
def test_bad_arguments_raise(model, data, attack, kwargs, message):
    x, y = data
    with pytest.raises(ValueError, match=message):
        attack(model, x[:4], y[:4], **kwargs)


def test_numpy_scalar_arguments(model, data):
    x, y = data
    adv = pgd(model, x[:4], y[:4], epsilon=np.float32(0.1), step_size=0.05, steps=np.int64(2))
    assert np.abs(np.asarray(adv) - x[:4]).max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        fgsm(model, x[:4], y[:4], epsilon=np.float32(-0.1))


def test_bad_loss_message_names_valid_losses(model, data):
    x, y = data
    with pytest.raises(ValueError) as info:
        pgd(model, x[:4], y[:4], epsilon=0.1, step_size=0.01, steps=1, loss="foo")
    assert "'foo'" in str(info.value) and "ce" in str(info.value) and "cw" in str(info.value)


# 6c. Inside tf.function, on plain callables and on a SavedModel.


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_attacks_inside_tf_function(model, data, loss):
    x, y = data
    kwargs = dict(epsilon=EPS, step_size=STEP, steps=3, restarts=2, loss=loss, seed=2)
    eager = np.asarray(pgd(model, x, y, **kwargs))
    eager_fgsm = np.asarray(fgsm(model, x, y, epsilon=EPS, loss=loss))

    spec = (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None], tf.int32))

    @tf.function(input_signature=spec)
    def graph_pgd(images, labels):
        return pgd(model, images, labels, **kwargs)

    @tf.function(input_signature=spec)
    def graph_fgsm(images, labels):
        return fgsm(model, images, labels, epsilon=EPS, loss=loss)

    graph = np.asarray(graph_pgd(x, y))
    np.testing.assert_allclose(graph, eager, atol=1e-6)
    np.testing.assert_allclose(np.asarray(graph_fgsm(x, y)), eager_fgsm, atol=1e-6)
    np.testing.assert_array_equal(np_fooled(model, graph, y), np_fooled(model, eager, y))
    assert np.abs(graph - x).max() <= EPS + 1e-6


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_on_plain_callable(model, data, attack):
    x, y = data
    if attack == "fgsm":

        def run(m):
            return fgsm(m, x, y, epsilon=EPS)
    else:

        def run(m):
            return pgd(m, x, y, epsilon=EPS, step_size=STEP, steps=3, restarts=2)

    expected = np.asarray(run(model))
    got = np.asarray(run(lambda images: model(images)))
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert np_accuracy(model, got, y) < np_accuracy(model, x, y) - 0.2


def test_attacks_on_saved_model(model, data, tmp_path):
    x, y = data
    path = str(tmp_path / "export")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # must outlive `serve` (it owns the variables)
    serve = loaded.serve
    np.testing.assert_allclose(np.asarray(serve(x)), np.asarray(model(x)), atol=1e-5)

    kwargs = dict(epsilon=EPS, step_size=STEP, steps=3, seed=1)
    adv = np.asarray(pgd(serve, x, y, **kwargs))
    assert np.abs(adv - x).max() <= EPS + 1e-6
    # Same gradients up to float noise: same fooled set as the Keras model,
    # except possibly for a few examples near a sign flip.
    ref = np.asarray(pgd(model, x, y, **kwargs))
    agree = np.mean(np_fooled(model, adv, y) == np_fooled(model, ref, y))
    assert agree > 0.95
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    assert accuracy_under_attack(serve, ds, verbose=False) == pytest.approx(
        np_accuracy(model, x, y), abs=1e-12
    )
    robust = accuracy_under_attack(serve, ds, pgd, verbose=False, **kwargs)
    assert robust < np_accuracy(model, x, y) - 0.2


def test_early_stop_only_saves_work(model, data):
    """early_stop changes neither who is fooled nor, with early_stop=False, the step count."""
    x, y = data
    calls = []

    def counting(images):
        calls.append(1)
        return model(images)

    kwargs = dict(epsilon=0.5, step_size=0.1, steps=30, random_start=False)
    stopped = pgd(model, x[:16], y[:16], **kwargs)
    full = pgd(counting, x[:16], y[:16], early_stop=False, **kwargs)
    assert len(calls) == 31  # eager: every step's forward pass plus the last one
    fooled = lambda adv: np.argmax(model(adv), -1) != y[:16]  # noqa: E731
    np.testing.assert_array_equal(fooled(stopped), fooled(full))
    assert fooled(full).all()  # ε=0.5 fools this model everywhere, so early stop kicked in


# 7. The clean image counts for fooling; float16 models with large margins.


def test_misclassified_clean_image_counts_as_fooled():
    # Label 0 at u = 0.5 is misclassified (class 1 wins within 1e-3 of 0.5), but
    # every other point of the ball is classified right, with a margin so large
    # that the loss gradient there is 0: PGD's iterates alone would call it robust.
    def model(images):
        u = tf.reshape(images, [-1])
        return tf.stack([tf.zeros_like(u), 1.0 - 1e7 * tf.square(u - 0.5)], axis=-1)

    x = np.array([0.5, 0.2], np.float32).reshape(2, 1, 1, 1)
    y = np.zeros(2, np.int32)
    assert np_fooled(model, x, y).tolist() == [True, False]
    seen = []

    def recording(images):
        seen.append(np.asarray(images).ravel().copy())
        return model(images)

    adv = pgd(recording, x, y, epsilon=0.1, step_size=0.025, steps=10, seed=0)
    iterates = np.stack(seen[1:])[:, 0]  # seen[0]: the clean pass; then start, steps, last
    assert not np_fooled(model, iterates.reshape(-1, 1, 1, 1), np.zeros(len(iterates))).any()
    np.testing.assert_array_equal(np_fooled(model, adv, y), [True, False])
    np.testing.assert_array_equal(np.asarray(adv)[0], x[0])  # the clean image itself
    for random_start in (True, False):
        adv = pgd(model, x, y, epsilon=0.1, step_size=0.025, steps=3, random_start=random_start)
        np.testing.assert_array_equal(np_fooled(model, adv, y), [True, False])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    robust = accuracy_under_attack(
        model, ds, pgd, epsilon=0.1, step_size=0.025, steps=10, verbose=False
    )
    assert robust == 0.5


def test_pgd_clean_candidate_keeps_a_stronger_fooling_iterate(model, data):
    # Where the clean image already fools, a fooling iterate with a higher loss
    # still replaces it (the selection rule is unchanged).
    x, y = data
    wrong = np_fooled(model, x, y)
    assert 0 < wrong.sum() < len(y)
    adv = np.asarray(pgd(model, x, y, epsilon=EPS, step_size=STEP, steps=5, seed=3))
    assert np_fooled(model, adv, y)[wrong].all()
    z_adv = np.asarray(model(adv), np.float64)
    z_clean = np.asarray(model(x), np.float64)
    moved = np.abs(adv - x).reshape(len(y), -1).max(-1) > 0
    assert np.all(np_ce(y, z_adv)[wrong & moved] > np_ce(y, z_clean)[wrong & moved])
    assert (wrong & moved).any()


@pytest.fixture
def float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def large_margin_net(slope: float = 4.0):
    """Dense on 4x4 images: z_0 - z_1 = 2·slope·(Σx - 8) + 20: 20 at x = 0.5."""
    net = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
    kernel = np.zeros((16, 4), np.float32)
    kernel[:, 0], kernel[:, 1] = slope, -slope
    b = 10.0 - 8 * slope
    net.layers[-1].set_weights([kernel, np.array([b, -b, -30.0, -30.0], np.float32)])
    return net


@pytest.mark.parametrize("slope,epsilon", [(4.0, 0.3), (100.0, 0.05)], ids=["margin", "overflow"])
def test_attacks_flip_large_margin_under_mixed_float16(float16_policy, tmp_path, slope, epsilon):
    from tf_free.attacks import cross_entropy_loss
    from tf_free.export import export_saved_model, load_logits_fn

    x = np.full((2, 4, 4, 1), 0.5, np.float32)
    y = np.zeros(2, np.int32)
    kwargs = dict(epsilon=epsilon, step_size=epsilon / 3, steps=5)
    keras.mixed_precision.set_global_policy("float32")
    net32 = large_margin_net(slope)
    keras.mixed_precision.set_global_policy("mixed_float16")
    net16 = large_margin_net(slope)
    assert net16(x).dtype == tf.float16 and net32(x).dtype == tf.float32
    z = np.asarray(net16(x), np.float32)
    assert z[0, 0] - z[0, 1] == pytest.approx(20.0, abs=0.1)
    # Premise: PGD flips the float32 model, and the float16 model's unscaled
    # input gradient is exactly 0 (softmax tails of e^-20 underflow in float16).
    assert np_fooled(net32, pgd(net32, x, y, **kwargs), y).all()
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(cross_entropy_loss(y, net16(xt)))
    assert not np.any(np.asarray(tape.gradient(total, xt)))

    assert np_fooled(net16, pgd(net16, x, y, **kwargs), y).all()
    assert np_fooled(net16, pgd(net16, x, y, loss="cw", **kwargs), y).all()
    assert np_fooled(net16, fgsm(net16, x, y, epsilon=epsilon), y).all()
    # The same through an exported SavedModel of the float16 model.
    logits_fn = load_logits_fn(export_saved_model(net16, str(tmp_path / "export")))
    assert logits_fn(x).dtype == tf.float16
    adv = pgd(logits_fn, x, y, **kwargs)
    assert np.abs(np.asarray(adv) - x).max() <= epsilon + 1e-6
    assert np_fooled(net16, adv, y).all()
    # Loss values stay unscaled (APGD compares them), and the gradient is finite
    # (for slope 100, 2**10 · 200 overflows float16: the scale must back off).
    from tf_free.attacks.core import _logits_loss_grad

    _, losses, grad = _logits_loss_grad(net16, xt, tf.constant(y), cw_loss)
    np.testing.assert_allclose(np.asarray(losses), np_cw(y, z), atol=0.05)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad) < 0)
