"""Tests for APGD, APGD-T (tf_free.attacks.adaptive_pgd) and the AutoAttack ensemble.

References are independent of the code under test: the DLR losses in closed form
from numpy sorts, the checkpoint schedule from the paper's formula in exact
fractions and from a transliteration of the reference's counter loop, and APGD
itself from a numpy transliteration of `attack_single_run` / `perturb` in
fra31/auto-attack (autoattack/autopgd_base.py) on a linear model with
closed-form gradients. The ensemble is checked against numpy argmax accuracies
and against each of its attacks run alone.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_free.attacks import accuracy_under_attack, pgd
from tf_free.attacks.adaptive_pgd import (
    apgd,
    apgd_checkpoints,
    apgd_t,
    dlr_loss,
    targeted_dlr_loss,
)
from tf_free.attacks.ensemble import (
    ATTACKS,
    attack_accuracy,
    autoattack,
    autoattack_accuracy,
    get_attack,
)

NUM_CLASSES = 10


def np_fooled(model, images, labels) -> np.ndarray:
    logits = np.asarray(model(tf.constant(images, tf.float32)))
    return np.argmax(logits, axis=-1) != np.asarray(labels)


# 1. The DLR losses against their closed forms.


def np_dlr(labels, logits):
    """-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12), by explicit sorting and deletion."""
    out = []
    for z, y in zip(logits.astype(np.float64), labels, strict=True):
        s = np.sort(z)[::-1]
        out.append(-(z[y] - np.max(np.delete(z, y))) / (s[0] - s[2] + 1e-12))
    return np.array(out)


def np_targeted_dlr(labels, logits, targets):
    out = []
    for z, y, t in zip(logits.astype(np.float64), labels, targets, strict=True):
        s = np.sort(z)[::-1]
        out.append(-(z[y] - z[t]) / (s[0] - 0.5 * (s[2] + s[3]) + 1e-12))
    return np.array(out)


HAND_LOGITS = np.array(
    [
        [4.0, 1.0, 0.0, -1.0],  # true class on top: margin 3, π1-π3 = 4
        [1.0, 4.0, 0.0, -1.0],  # true class second
        [-1.0, 0.0, 1.0, 4.0],  # true class last
        [2.0, 2.0, 1.0, 0.0],  # tie between the true class and another
        [0.0, 3.0, 3.0, 1.0],  # tie between two wrong classes
        [-100.0, -200.0, 50.0, 49.0],  # large magnitudes
    ],
    np.float32,
)
HAND_LABELS = np.array([0, 0, 0, 0, 0, 3])


def test_dlr_loss_closed_form():
    expected = np_dlr(HAND_LABELS, HAND_LOGITS)
    # By hand: -(4-1)/(4-0), -(1-4)/(4-0), -(-1-4)/(4-0), -(2-2)/(2-1), -(0-3)/(3-1),
    # -(49-50)/(50+100).
    np.testing.assert_allclose(expected, [-0.75, 0.75, 1.25, 0.0, 1.5, 1 / 150])
    got = np.asarray(dlr_loss(tf.constant(HAND_LABELS), tf.constant(HAND_LOGITS)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_targeted_dlr_loss_closed_form():
    targets = np.array([1, 2, 3, 1, 2, 2])
    expected = np_targeted_dlr(HAND_LABELS, HAND_LOGITS, targets)
    # By hand, rows 1-2: -(4-1)/(4-(0-1)/2) = -3/4.5, -(1-0)/(4-(0-1)/2) = -1/4.5.
    np.testing.assert_allclose(expected[:2], [-3 / 4.5, -1 / 4.5])
    got = targeted_dlr_loss(tf.constant(HAND_LABELS), tf.constant(HAND_LOGITS), targets)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7)


def test_dlr_losses_random_logits_and_float16():
    rng = np.random.RandomState(0)
    logits = rng.normal(scale=5, size=(300, NUM_CLASSES)).astype(np.float32)
    labels = rng.randint(0, NUM_CLASSES, size=300)
    targets = (labels + rng.randint(1, NUM_CLASSES, size=300)) % NUM_CLASSES
    for z in (logits, logits.astype(np.float16)):
        z32 = z.astype(np.float32)
        got = np.asarray(dlr_loss(labels, tf.constant(z)))
        np.testing.assert_allclose(got, np_dlr(labels, z32), rtol=1e-5, atol=1e-6)
        got = np.asarray(targeted_dlr_loss(labels, tf.constant(z), targets))
        np.testing.assert_allclose(got, np_targeted_dlr(labels, z32, targets), rtol=1e-5, atol=1e-6)
    # DLR > 0 exactly when misclassified (no ties here).
    got = np.asarray(dlr_loss(labels, tf.constant(logits)))
    np.testing.assert_array_equal(got > 0, np.argmax(logits, -1) != labels)


def test_dlr_losses_need_enough_classes():
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(tf.constant([0]), tf.zeros([1, 2]))
    with pytest.raises(ValueError, match="at least 4 classes"):
        targeted_dlr_loss(tf.constant([0]), tf.zeros([1, 3]), tf.constant([1]))


# 2. The checkpoint schedule.


def paper_checkpoints(steps: int) -> list[int]:
    """w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [Fraction(0), Fraction(22, 100)]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
        if nxt * steps > steps:
            break
        p.append(nxt)
    out = []
    for value in p:
        w = value * steps
        out.append(w.numerator // w.denominator + (w.denominator != 1))  # exact ceil
    return out


def reference_counter_checkpoints(steps: int) -> list[int]:
    """The iterations i+1 at which autopgd_base.py's `counter3 == k` fires (L298-L438)."""
    n_iter_2 = max(int(0.22 * steps), 1)
    n_iter_min = max(int(0.06 * steps), 1)
    size_decr = max(int(0.03 * steps), 1)
    k, counter3, out = n_iter_2, 0, [0]
    for i in range(steps):
        counter3 += 1
        if counter3 == k:
            out.append(i + 1)
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return out


def test_apgd_checkpoints_for_100_steps():
    # The paper's schedule for N_iter = 100 (p_j: 0, .22, .41, .57, .70, .80, .87,
    # .93, .99), which is also where the reference code halves the step.
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert paper_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert reference_counter_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 33, 50, 99, 100, 101, 250, 1000])
def test_apgd_checkpoints_follow_the_reference_code(steps):
    got = apgd_checkpoints(steps)
    assert got == reference_counter_checkpoints(steps)
    assert got[0] == 0 and got[-1] <= steps
    assert all(b > a for a, b in zip(got, got[1:], strict=False))


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "100"])
def test_apgd_checkpoints_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        apgd_checkpoints(steps)


# 3. APGD against a numpy transliteration of the reference (TF's autodiff for its gradients).

SIDE = 6  # 6x6x1 images: 36 pixels
FREQ = 25.0  # period 2π/25 ≈ 0.25: the loss bends within the ε-balls (ε = 0.01-0.015)


class PixelModel:
    """z_c = b_c + Σ_{i: i mod 10 = c} w_i sin(25 x_i + φ_i): every pixel drives one logit.

    Non-concave within the ε-balls, so APGD's iterates oscillate and its
    step-size rules matter. Calling it records every input (in `calls`, for
    eager runs); `loss_and_grad` is the reference's forward pass, which does not.
    """

    def __init__(self, seed: int = 0):
        rng = np.random.RandomState(seed)
        d = SIDE * SIDE
        self.w = (rng.uniform(0.3, 0.6, size=d) * rng.choice([-1.0, 1.0], size=d)).astype(
            np.float32
        )
        self.phase = rng.uniform(0, 2 * np.pi, size=d).astype(np.float32)
        self.owner = np.eye(NUM_CLASSES, dtype=np.float32)[np.arange(d) % NUM_CLASSES]  # [d, C]
        self.bias = rng.normal(scale=0.5, size=NUM_CLASSES).astype(np.float32)
        self.calls = []

    def __call__(self, images):
        if tf.executing_eagerly():
            self.calls.append(np.array(images))
        return self.logits(images)

    def logits(self, images):
        u = tf.sin(FREQ * tf.reshape(images, [-1, self.owner.shape[0]]) + self.phase)
        return (u * self.w) @ self.owner + self.bias

    def loss_and_grad(self, x, y, loss, targets=None):
        """Logits, per-example loss and ∇ₓ of the summed loss, as the reference's criteria.

        The losses are written as in autopgd_base.py (sorts, an indicator), not
        with tf_free's functions; TF's autodiff stands in for torch's.
        """
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = self.logits(x)
            if loss == "ce":  # nn.CrossEntropyLoss(reduction="none")
                values = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)
            else:
                z_sorted = tf.sort(z, axis=1)
                z_y = tf.gather(z, y, axis=1, batch_dims=1)
                if loss == "dlr":  # dlr_loss, L191-L197
                    ind = tf.cast(tf.argsort(z, axis=1)[:, -1] == y, tf.float32)
                    values = -(z_y - z_sorted[:, -2] * ind - z_sorted[:, -1] * (1.0 - ind)) / (
                        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
                    )
                else:  # dlr_loss_targeted, L595-L600
                    z_t = tf.gather(z, targets, axis=1, batch_dims=1)
                    values = -(z_y - z_t) / (
                        z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
                    )
            total = tf.reduce_sum(values)
        return z.numpy(), values.numpy(), tape.gradient(total, x).numpy()


def reference_single_run(model, x, y, t, *, eps, n_iter, loss, targets=None, calls=None):
    """`APGDAttack.attack_single_run` (autopgd_base.py L201-L443), L∞, line by line.

    `t` is the random start's uniform draw in [-1, 1] (the reference draws it
    with torch.rand). Appends every point it evaluates to `calls`. Returns
    x_best, acc, loss_best, x_best_adv as the reference.
    """
    n = len(y)

    def forward(x_):
        calls.append(x_.copy())
        return model.loss_and_grad(x_, y, loss, targets)

    n_iter_2 = max(int(0.22 * n_iter), 1)
    n_iter_min = max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    norm = np.abs(t).reshape(n, -1).max(1).reshape(-1, 1, 1, 1)
    eps = np.float32(eps)  # float32 throughout, as the images
    x_adv = np.clip(x + eps * (t / (norm + np.float32(1e-12))), 0.0, 1.0)
    x_best, x_best_adv = x_adv.copy(), x_adv.copy()
    loss_steps = np.zeros([n_iter, n])
    logits, loss_indiv, grad = forward(x_adv)
    grad_best = grad.copy()
    acc = logits.argmax(1) == y
    loss_best = loss_indiv.copy()
    step_size = np.full([n, 1, 1, 1], 2.0 * eps, np.float32)
    x_adv_old = x_adv.copy()
    k = n_iter_2
    counter3 = 0
    loss_best_last_check = loss_best.copy()
    reduced_last_check = np.ones(n)
    for i in range(n_iter):
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv.copy()
        a = np.float32(0.75 if i > 0 else 1.0)
        x_adv_1 = x_adv + step_size * np.sign(grad)
        x_adv_1 = np.clip(np.minimum(np.maximum(x_adv_1, x - eps), x + eps), 0.0, 1.0)
        x_adv_1 = np.clip(
            np.minimum(
                np.maximum(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps
            ),
            0.0,
            1.0,
        )
        x_adv = x_adv_1
        logits, loss_indiv, grad = forward(x_adv)
        pred = logits.argmax(1) == y
        acc = np.minimum(acc, pred)
        x_best_adv[~pred] = x_adv[~pred]
        y1 = loss_indiv.copy()
        loss_steps[i] = y1
        ind = y1 > loss_best
        x_best[ind] = x_adv[ind]
        grad_best[ind] = grad[ind]
        loss_best[ind] = y1[ind]
        counter3 += 1
        if counter3 == k:
            # check_oscillation: loss_steps[-1] is the unwritten last row (0), as in torch.
            increases = np.zeros(n)
            for c in range(k):
                increases += loss_steps[i - c] > loss_steps[i - c - 1]
            fl_oscillation = (increases <= k * 0.75).astype(float)
            fl_reduce_no_impr = (1.0 - reduced_last_check) * (loss_best_last_check >= loss_best)
            fl_oscillation = np.maximum(fl_oscillation, fl_reduce_no_impr)
            reduced_last_check = fl_oscillation.copy()
            loss_best_last_check = loss_best.copy()
            reduce = fl_oscillation > 0
            step_size[reduce] /= 2.0
            x_adv[reduce] = x_best[reduce]
            grad[reduce] = grad_best[reduce]
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return x_best, acc, loss_best, x_best_adv


def start_draw(shape, seed, salt):
    """The start's uniform draw: one [H, W, C] pattern per (seed, salt), as apgd draws it."""
    u = tf.random.stateless_uniform(shape[1:], seed=tf.constant([seed, salt], tf.int64))
    return np.broadcast_to(2.0 * u.numpy() - 1.0, shape)


def reference_perturb(model, x, y, *, eps, n_iter, loss, restarts, seed, n_targets=None):
    """`perturb` (L445-L524; APGD-T: L606-L686) over the examples still classified right.

    Returns the fooled flags, per example the highest-loss point over the runs
    (by the run's loss for APGD, by untargeted DLR across APGD-T's targets), and
    per run the list of points evaluated.
    """
    fooled = model.logits(x).numpy().argmax(1) != y
    best_x, best_score = x.copy(), np.full(len(y), -np.inf)
    if n_targets is None:
        runs = [(loss, None)] * restarts
    else:
        # The target of target_class = i + 1 is sort(z)[1][:, -(i + 1)], on clean logits.
        order = np.argsort(-model.logits(x).numpy(), axis=1, kind="stable")
        runs = [
            ("dlr-targeted", order[:, i]) for i in range(1, n_targets + 1) for _ in range(restarts)
        ]
    calls = []
    for salt, (run_loss, targets) in enumerate(runs):
        idx = np.flatnonzero(~fooled)
        if len(idx) == 0:
            break
        calls.append([])
        x_best, acc, loss_best, _ = reference_single_run(
            model,
            x[idx],
            y[idx],
            start_draw(x[idx].shape, seed, salt),
            eps=eps,
            n_iter=n_iter,
            loss=run_loss,
            targets=None if targets is None else targets[idx],
            calls=calls[-1],
        )
        score = loss_best if targets is None else model.loss_and_grad(x_best, y[idx], "dlr")[1]
        better = score > best_score[idx]
        best_x[idx[better]] = x_best[better]
        best_score[idx[better]] = score[better]
        fooled[idx[~acc]] = True
    return fooled, best_x, calls


@pytest.fixture(scope="module")
def pixel():
    model = PixelModel()
    rng = np.random.RandomState(1)
    x = rng.uniform(0, 1, size=(24, SIDE, SIDE, 1)).astype(np.float32)
    x[:, 0, 0, 0] = 0.0  # saturated pixels exercise the [0, 1] clip
    x[:, -1, -1, 0] = 1.0
    y = model.logits(x).numpy().argmax(1).astype(np.int32)
    y[:3] = (y[:3] + 1) % NUM_CLASSES  # three examples misclassified from the start
    return model, x, y


def run_eagerly_and_record(model, attack):
    """Runs `attack()` op by op, so that `model.calls` records every point it evaluates."""
    model.calls.clear()
    tf.config.run_functions_eagerly(True)
    try:
        adv = np.asarray(attack())
    finally:
        tf.config.run_functions_eagerly(False)
    calls = list(model.calls)
    model.calls.clear()
    return adv, calls


def check_against_reference(model, x, y, adv, calls, reference):
    fooled, best_x, reference_calls = reference
    np.testing.assert_array_equal(np_fooled(model, adv, y), fooled)
    # Not vacuous: some examples are fooled by the attack, some are not.
    assert 3 < fooled.sum() < len(y)
    # Every point evaluated, in order: the clean batch, then per run the
    # reference's points and one evaluation of the run's result.
    np.testing.assert_array_equal(calls[0], x)
    calls = calls[1:]
    assert len(calls) == sum(len(run) + 1 for run in reference_calls)
    for run in reference_calls:
        for got, expected in zip(calls, run, strict=False):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
        calls = calls[len(run) + 1 :]
    # Where none fools, the highest-loss point of all runs.
    np.testing.assert_allclose(adv[~fooled], best_x[~fooled], rtol=0, atol=1e-7)
    # Misclassified clean images are returned unchanged.
    np.testing.assert_array_equal(adv[:3], x[:3])


@pytest.mark.parametrize(
    "loss,restarts,eps,steps",
    [("ce", 1, 0.01, 100), ("dlr", 1, 0.01, 100), ("ce", 2, 0.015, 30), ("dlr", 3, 0.015, 20)],
)
def test_apgd_iterates_match_reference_transliteration(pixel, loss, restarts, eps, steps):
    model, x, y = pixel
    kwargs = dict(epsilon=eps, steps=steps, loss=loss, restarts=restarts, seed=3)
    reference = reference_perturb(
        model, x, y, eps=eps, n_iter=steps, loss=loss, restarts=restarts, seed=3
    )
    adv, calls = run_eagerly_and_record(model, lambda: apgd(model, x, y, **kwargs))
    check_against_reference(model, x, y, adv, calls, reference)
    # Compiled (the default), the result is the same.
    compiled = np.asarray(apgd(model, x, y, **kwargs))
    np.testing.assert_allclose(compiled, adv, atol=1e-6)


@pytest.mark.parametrize("restarts,n_targets", [(1, 4), (2, 2)])
def test_apgd_t_iterates_match_reference_transliteration(pixel, restarts, n_targets):
    model, x, y = pixel
    reference = reference_perturb(
        model, x, y, eps=0.01, n_iter=30, loss=None, restarts=restarts, seed=5, n_targets=n_targets
    )
    adv, calls = run_eagerly_and_record(
        model,
        lambda: apgd_t(
            model,
            x,
            y,
            epsilon=0.01,
            steps=30,
            n_target_classes=n_targets,
            restarts=restarts,
            seed=5,
        ),
    )
    check_against_reference(model, x, y, adv, calls, reference)


def test_apgd_t_nine_targets_match_reference(pixel):
    model, x, y = pixel
    fooled, best_x, _ = reference_perturb(
        model, x, y, eps=0.01, n_iter=20, loss=None, restarts=1, seed=0, n_targets=9
    )
    adv = np.asarray(apgd_t(model, x, y, epsilon=0.01, steps=20))
    np.testing.assert_array_equal(np_fooled(model, adv, y), fooled)
    np.testing.assert_allclose(adv[~fooled], best_x[~fooled], rtol=0, atol=1e-7)


def test_apgd_result_does_not_depend_on_the_batch(pixel):
    """An example's result depends only on itself and the seed (one start pattern per batch)."""
    model, x, y = pixel
    whole = np.asarray(apgd(model, x, y, epsilon=0.05, seed=1))
    parts = [
        np.asarray(apgd(model, x[i : i + 7], y[i : i + 7], epsilon=0.05, seed=1))
        for i in (0, 7, 14, 21)
    ]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-7)
    reversed_ = np.asarray(apgd_t(model, x[::-1], y[::-1], epsilon=0.05, n_target_classes=2))
    forward = np.asarray(apgd_t(model, x, y, epsilon=0.05, n_target_classes=2))
    np.testing.assert_allclose(reversed_[::-1], forward, atol=1e-7)


# 4. A small trained CNN: APGD vs PGD, the ensemble vs its attacks.

EPS = 0.03  # the tiny CNN keeps about half of its accuracy
ENSEMBLE_N = 200  # examples for the (slower) full ensemble


def make_data(n: int, seed: int):
    """8x8 images: a class-specific template on noise (10 classes)."""
    templates = np.random.RandomState(100).uniform(-1, 1, size=(NUM_CLASSES, 8, 8, 1))
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, NUM_CLASSES, size=n).astype(np.int32)
    images = 0.5 + 0.12 * templates[labels] + rng.normal(scale=0.15, size=(n, 8, 8, 1))
    return np.clip(images, 0, 1).astype(np.float32), labels


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    x, y = make_data(2000, seed=0)
    net = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    net.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    net.fit(x, y, batch_size=100, epochs=5, verbose=0)
    return net


@pytest.fixture(scope="module")
def cnn_data():
    return make_data(400, seed=1)


@pytest.fixture(scope="module")
def ensemble_run(cnn, cnn_data):
    """Every attack alone and the standard ensemble, on the same 200 examples."""
    x, y = cnn_data[0][:ENSEMBLE_N], cnn_data[1][:ENSEMBLE_N]
    alone = {name: np.asarray(get_attack(name)(cnn, x, y, epsilon=EPS, seed=0)) for name in ATTACKS}
    ensemble = np.asarray(autoattack(cnn, x, y, epsilon=EPS, seed=0))
    return alone, ensemble


def test_apgd_at_least_as_strong_as_pgd20(cnn, cnn_data):
    x, y = cnn_data
    clean = 1 - np_fooled(cnn, x, y).mean()
    # PGD-20 as in this project's tables (step ε/10, random start).
    pgd20 = np_fooled(cnn, pgd(cnn, x, y, epsilon=EPS, step_size=EPS / 10, steps=20), y)
    apgd_ce = np_fooled(cnn, apgd(cnn, x, y, epsilon=EPS), y)
    apgd_dlr = np_fooled(cnn, apgd(cnn, x, y, epsilon=EPS, loss="dlr"), y)
    apgd_tgt = np_fooled(cnn, apgd_t(cnn, x, y, epsilon=EPS), y)
    assert 1 - apgd_ce.mean() <= 1 - pgd20.mean()
    assert 1 - apgd_tgt.mean() <= 1 - pgd20.mean()
    # Not vacuous: the attacks bite, but some examples stay robust.
    assert clean > 0.8
    assert 0.1 < 1 - apgd_ce.mean() < clean - 0.2, (clean, apgd_ce.mean())
    assert apgd_dlr.mean() > 0.3


def test_every_output_in_ball_and_box(cnn_data, ensemble_run):
    x = cnn_data[0][:ENSEMBLE_N]
    alone, ensemble = ensemble_run
    for name, adv in [*alone.items(), ("autoattack", ensemble)]:
        assert adv.shape == x.shape and adv.dtype == np.float32, name
        assert np.abs(adv - x).max() <= EPS + 1e-6, name
        assert adv.min() >= 0.0 and adv.max() <= 1.0, name


def test_autoattack_at_most_each_component(cnn, cnn_data, ensemble_run):
    y = cnn_data[1][:ENSEMBLE_N]
    alone, ensemble = ensemble_run
    fooled = np_fooled(cnn, ensemble, y)
    for name, adv in alone.items():
        component = np_fooled(cnn, adv, y)
        assert 1 - fooled.mean() <= 1 - component.mean(), name
        # APGD's result depends on nothing but the example and the seed, so
        # the ensemble fools every example APGD-CE or APGD-T fools alone.
        if name.startswith("apgd"):
            assert np.all(fooled[component]), name
    # Not vacuous: the ensemble beats APGD-CE somewhere, and leaves some robust.
    assert fooled.sum() > np_fooled(cnn, alone["apgd-ce"], y).sum()
    assert not fooled.all()


def test_autoattack_accuracy_matches_numpy(cnn, cnn_data, capsys):
    x, y = cnn_data
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)  # the last batch is partial
    result = autoattack_accuracy(cnn, ds, epsilon=EPS, version="fast", num_examples=150, seed=0)
    out = capsys.readouterr().out
    assert "robust accuracy after APGD-CE" in out and "robust accuracy after APGD-T" in out
    assert result["num_examples"] == 150
    assert result["clean"] == pytest.approx(1 - np_fooled(cnn, x[:150], y[:150]).mean(), abs=1e-12)
    assert list(result["robust"]) == ["apgd-ce", "apgd-t"]
    assert list(result["seconds"]) == ["apgd-ce", "apgd-t"]
    assert all(s > 0 for s in result["seconds"].values())
    # Cumulative worst case: each attack only ever lowers the accuracy.
    assert result["clean"] >= result["robust"]["apgd-ce"] >= result["robust"]["apgd-t"]
    assert result["final"] == result["robust"]["apgd-t"]
    # The same as the batch-level ensemble on all 150 (APGD does not depend on
    # how the robust examples are batched), judged by numpy argmax.
    adv = autoattack(cnn, x[:150], y[:150], epsilon=EPS, version="fast", seed=0)
    assert result["final"] == pytest.approx(1 - np_fooled(cnn, adv, y[:150]).mean(), abs=1e-12)
    # One attack alone, as a column, equals accuracy_under_attack with it.
    alone = attack_accuracy(cnn, ds, "apgd-ce", epsilon=EPS, num_examples=150, verbose=False)
    expected = accuracy_under_attack(
        cnn, ds, get_attack("apgd-ce"), epsilon=EPS, num_examples=150, verbose=False
    )
    assert alone["final"] == pytest.approx(expected, abs=1e-12)
    assert alone["robust"]["apgd-ce"] == pytest.approx(result["robust"]["apgd-ce"], abs=1e-12)


# 5. A misclassified clean example counts as fooled, in every attack.


def one_pixel_model(images):
    """10 logits of the single pixel u: class 1 wins only within 1e-3 of u = 0.5.

    Label 0 at u = 0.5 is misclassified, but every other point of the ε-ball is
    classified right, with a margin so large that the loss gradient there is 0
    in float32: no attack can move back to the clean point.
    """
    u = tf.reshape(images, [-1])
    bump = 1.0 - 1e7 * tf.square(u - 0.5)
    rest = [tf.fill(tf.shape(u), -5.0 - c) for c in range(8)]
    return tf.stack([tf.zeros_like(u), bump, *rest], axis=-1)


def ensemble_of(model, images, labels, attacks):
    return autoattack(model, images, labels, epsilon=0.1, attacks=attacks)


ALL_ATTACKS = {
    "pgd": lambda m, x, y: pgd(m, x, y, epsilon=0.1, step_size=0.025, steps=10),
    "pgd-no-random-start": lambda m, x, y: pgd(
        m, x, y, epsilon=0.1, step_size=0.025, steps=10, random_start=False
    ),
    "apgd-ce": lambda m, x, y: apgd(m, x, y, epsilon=0.1, steps=10),
    "apgd-dlr": lambda m, x, y: apgd(m, x, y, epsilon=0.1, steps=10, loss="dlr", restarts=2),
    "apgd-t": lambda m, x, y: apgd_t(m, x, y, epsilon=0.1, steps=10),
    **{f"ensemble-{name}": functools.partial(ensemble_of, attacks=[name]) for name in ATTACKS},
    "autoattack": lambda m, x, y: autoattack(m, x, y, epsilon=0.1),
}


@pytest.mark.parametrize("name", list(ALL_ATTACKS))
def test_misclassified_clean_example_counts_as_fooled(name):
    x = np.array([0.5, 0.2, 0.8], np.float32).reshape(3, 1, 1, 1)
    y = np.zeros(3, np.int32)
    # Premises, in numpy: the clean point 0.5 is misclassified, points 2e-3
    # away and the other examples' whole balls are classified right.
    z = lambda u: np.array([0.0, 1.0 - 1e7 * (u - 0.5) ** 2])  # noqa: E731
    assert np.argmax(z(0.5)) == 1 and np.argmax(z(0.502)) == 0 and np.argmax(z(0.498)) == 0
    adv = np.asarray(ALL_ATTACKS[name](one_pixel_model, x, y))
    np.testing.assert_array_equal(np_fooled(one_pixel_model, adv, y), [True, False, False])
    assert np.abs(adv - x).max() <= 0.1 + 1e-6


# 6. Mixed precision, graph mode, bad arguments.


@pytest.fixture
def float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def large_margin_model():
    """Dense on 4x4 images: z_0 - z_1 = 8·Σx - 44, i.e. 20 at x = 0.5, -18.4 at x = 0.2."""
    net = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
    kernel = np.zeros((16, 4), np.float32)
    kernel[:, 0], kernel[:, 1] = 4.0, -4.0
    net.layers[-1].set_weights([kernel, np.array([-22.0, 22.0, -30.0, -30.0], np.float32)])
    return net


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr", "apgd-t"])
def test_apgd_flips_large_margin_under_mixed_float16(float16_policy, attack):
    net = large_margin_model()
    x = np.full((2, 4, 4, 1), 0.5, np.float32)
    y = np.zeros(2, np.int32)
    logits = np.asarray(net(x), np.float32)
    assert net(x).dtype == tf.float16 and logits[0, 0] - logits[0, 1] == pytest.approx(20, abs=0.1)
    fn = {
        "apgd-ce": lambda: apgd(net, x, y, epsilon=0.3, steps=10),
        "apgd-dlr": lambda: apgd(net, x, y, epsilon=0.3, steps=10, loss="dlr"),
        "apgd-t": lambda: apgd_t(net, x, y, epsilon=0.3, steps=10, n_target_classes=3),
    }[attack]
    assert np_fooled(net, fn(), y).all()


def test_apgd_inside_tf_function_on_saved_model(cnn, cnn_data, tmp_path):
    x, y = cnn_data
    x, y = x[:40], y[:40]
    path = str(tmp_path / "export")
    cnn.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    eager = np.asarray(apgd_t(cnn, x, y, epsilon=EPS, steps=20, n_target_classes=3))
    spec = (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None], tf.int32))
    graph = tf.function(
        lambda a, b: apgd_t(loaded.serve, a, b, epsilon=EPS, steps=20, n_target_classes=3),
        input_signature=spec,
    )
    adv = np.asarray(graph(x, y))
    agree = np.mean(np_fooled(cnn, adv, y) == np_fooled(cnn, eager, y))
    assert agree >= 0.95
    assert np_fooled(cnn, adv, y).mean() > np_fooled(cnn, x, y).mean() + 0.2


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m, x, y: apgd(m, x, y, epsilon=-0.1), "epsilon must be >= 0"),
        (lambda m, x, y: apgd(m, x, y, epsilon=0.1, steps=0), "steps must be an integer >= 1"),
        (lambda m, x, y: apgd(m, x, y, epsilon=0.1, restarts=0), "restarts must be"),
        (lambda m, x, y: apgd(m, x, y, epsilon=0.1, loss="cw"), "loss must be one of"),
        (lambda m, x, y: apgd(m, x, y, epsilon=0.1, clip_min=1.0, clip_max=0.0), "clip_min"),
        (lambda m, x, y: apgd_t(m, x, y, epsilon=0.1, n_target_classes=0), "n_target_classes"),
        (lambda m, x, y: autoattack(m, x, y, epsilon=0.1, version="plus"), "version must be"),
        (lambda m, x, y: autoattack(m, x, y, epsilon=0.1, attacks=["fab"]), "attack must be"),
        (lambda m, x, y: autoattack(m, x, y, epsilon=0.1, attacks=[]), "at least one"),
    ],
)
def test_bad_arguments_raise(pixel, call, message):
    model, x, y = pixel
    with pytest.raises(ValueError, match=message):
        call(model, x[:4], y[:4])


def test_autoattack_accuracy_bad_arguments(pixel):
    model, x, y = pixel
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(ValueError, match="num_examples"):
        autoattack_accuracy(model, ds, epsilon=0.1, num_examples=0, verbose=False)
    with pytest.raises(ValueError, match="attack must be one of"):
        attack_accuracy(model, ds, "apgd", epsilon=0.1, verbose=False)
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(8)
    with pytest.raises(ValueError, match="empty"):
        autoattack_accuracy(model, empty, epsilon=0.1, verbose=False)


def test_apgd_t_caps_target_classes_at_the_wrong_classes(pixel):
    model, x, y = pixel
    nine = np.asarray(apgd_t(model, x, y, epsilon=0.01, steps=5, n_target_classes=9))
    many = np.asarray(apgd_t(model, x, y, epsilon=0.01, steps=5, n_target_classes=50))
    np.testing.assert_array_equal(many, nine)
