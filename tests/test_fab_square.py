"""Tests for tf_free.attacks.fab (targeted FAB, L∞) and square_attack (L∞ Square).

Every check is against a reference computed independently in the test: the p
schedule against values written out by hand from AutoAttack's square.py, the
L∞ hyperplane projection against a float64 bisection on the radius, FAB-T
against the closed-form minimal L∞ distance of a linear model, and Square
against PGD on a model whose gradient is masked.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_free.attacks import pgd
from tf_free.attacks.fab import _project_linf_hyperplane, fab_t
from tf_free.attacks.square_attack import _p_selection, _square_size, square

NUM_CLASSES = 10
SHAPE = (8, 8, 1)
DIM = 64


class LinearModel:
    """logits = W·flatten(x) + b, optionally on an input whose gradient is masked."""

    def __init__(self, seed: int, masked: bool = False):
        rng = np.random.RandomState(seed)
        self.w = rng.randn(DIM, NUM_CLASSES).astype(np.float32)
        self.b = rng.randn(NUM_CLASSES).astype(np.float32)
        self.masked = masked

    def __call__(self, images):
        # Fails on an empty batch, as oneDNN convolutions in a SavedModel do:
        # the attacks must never call the model on 0 images.
        with tf.control_dependencies(
            [tf.debugging.assert_positive(tf.shape(images)[0], message="empty batch")]
        ):
            x = tf.reshape(tf.cast(images, tf.float32), [-1, DIM])
        if self.masked:
            # 8-bit quantisation with a zero gradient: the forward pass is
            # (almost) the linear model, but no gradient reaches the input.
            x = tf.stop_gradient(tf.round(x * 255.0) / 255.0) + 0.0 * x
        return tf.matmul(x, self.w) + self.b

    def numpy_logits(self, images):
        return images.reshape(len(images), DIM).astype(np.float64) @ self.w + self.b

    def min_linf_distance(self, images, labels):
        """Closed form: min over j ≠ y of (z_y - z_j) / ‖w_y - w_j‖₁.

        Exact while x ± distance stays in [0, 1] (images in [0.3, 0.7] and
        distances below 0.3): the box constraint is then inactive.
        """
        z = self.numpy_logits(images)
        dist = np.full(len(images), np.inf)
        for i, y in enumerate(labels):
            for j in range(NUM_CLASSES):
                if j != y:
                    gap = np.abs(self.w[:, y] - self.w[:, j]).astype(np.float64).sum()
                    dist[i] = min(dist[i], (z[i, y] - z[i, j]) / gap)
        return dist


def linear_problem(seed: int, n: int):
    model = LinearModel(seed)
    rng = np.random.RandomState(seed + 100)
    images = rng.uniform(0.3, 0.7, (n, *SHAPE)).astype(np.float32)
    labels = model.numpy_logits(images).argmax(1).astype(np.int32)
    return model, images, labels


def linf(a, b):
    return np.abs(a - b).reshape(len(a), -1).max(1)


# ---------------------------------------------------------------- Square schedule


def test_p_schedule_matches_reference():
    # p_selection of AutoAttack's square.py with p_init=0.8, n_queries=5000:
    # with resc_schedule=True query i counts as int(i / 5000 * 10000) = 2i.
    rescaled = {
        0: 0.8, 5: 0.8, 6: 0.4, 25: 0.4, 26: 0.2, 100: 0.2, 101: 0.1, 250: 0.1,
        251: 0.05, 500: 0.05, 501: 0.025, 1000: 0.025, 1001: 0.0125, 2000: 0.0125,
        2001: 0.00625, 3000: 0.00625, 3001: 0.003125, 4000: 0.003125,
        4001: 0.0015625, 4999: 0.0015625,
    }  # fmt: skip
    for query, p in rescaled.items():
        assert float(_p_selection(query, 5000, 0.8)) == pytest.approx(p), query
    # resc_schedule=False (AutoAttack's standard run): the raw query counts.
    raw = {
        0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 500: 0.1,
        501: 0.05, 1000: 0.05, 1001: 0.025, 2000: 0.025, 2001: 0.0125, 4000: 0.0125,
        4001: 0.00625, 4999: 0.00625,
    }  # fmt: skip
    for query, p in raw.items():
        assert float(_p_selection(query, 5000, 0.8, rescale=False)) == pytest.approx(p), query
    # Side of the square on 28x28x1: max(round(sqrt(p·784)), 1), by hand.
    sides = {0.8: 25, 0.4: 18, 0.2: 13, 0.1: 9, 0.05: 6, 0.025: 4, 0.0125: 3,
             0.00625: 2, 0.003125: 2, 0.0015625: 1, 1e-6: 1}  # fmt: skip
    for p, side in sides.items():
        assert int(_square_size(tf.constant(p, tf.float64), 28, 28, 1)) == side, p
    # Never larger than the image.
    assert int(_square_size(tf.constant(1.0, tf.float64), 4, 6, 3)) == 4


# ------------------------------------------------------------- L∞ projection


def bisection_radius(t, w, b, lo, hi):
    """min ‖d‖∞ s.t. w·(t + d) = b, lo <= t + d <= hi, by bisection on the radius.

    At radius λ the reachable values of w·d form the interval
    [Σ min(w l, w u), Σ max(w l, w u)] with l = max(-λ, lo - t), u = min(λ, hi - t);
    it grows with λ. Returns None when b is out of reach inside the box.
    """
    target = b - w @ t

    def reach(lam):
        low, up = np.maximum(-lam, lo - t), np.minimum(lam, hi - t)
        return np.minimum(w * low, w * up).sum(), np.maximum(w * low, w * up).sum()

    top = np.maximum(hi - t, t - lo).max()
    low, up = reach(top)
    if not low <= target <= up:
        return None
    a, z = 0.0, top
    for _ in range(100):
        mid = (a + z) / 2
        low, up = reach(mid)
        a, z = (a, mid) if low <= target <= up else (mid, z)
    return z


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 64, 200])
@pytest.mark.parametrize("box", [(0.0, 1.0), (-0.5, 2.0)])
def test_linf_projection_matches_bisection(dim, box):
    lo, hi = box
    rng = np.random.RandomState(dim)
    rows = 200
    t = rng.uniform(lo, hi, (rows, dim))
    t[rng.rand(rows, dim) < 0.15] = lo  # points on the faces of the box
    t[rng.rand(rows, dim) < 0.15] = hi
    w = rng.randn(rows, dim)
    w[rng.rand(rows, dim) < 0.2] = 0.0  # coordinates the hyperplane ignores
    scale = rng.choice([0.0, 0.01, 0.1, 0.5, 2.0], rows) * np.abs(w).sum(1)
    b = (w * t).sum(1) + rng.randn(rows) * scale
    d = _project_linf_hyperplane(
        t.astype(np.float32), w.astype(np.float32), b.astype(np.float32), lo, hi
    ).numpy()
    d = d.astype(np.float64)
    infeasible = 0
    for i in range(rows):
        radius = bisection_radius(t[i], w[i], b[i], lo, hi)
        if radius is None:
            # Out of reach: the box corner that moves w·x towards b the most.
            infeasible += 1
            direction = np.sign(w[i]) * np.sign(b[i] - w[i] @ t[i])
            corner = np.where(direction > 0, hi - t[i], np.where(direction < 0, lo - t[i], 0.0))
            np.testing.assert_allclose(d[i], corner, atol=1e-6)
            continue
        assert np.abs(d[i]).max() == pytest.approx(radius, rel=1e-4, abs=1e-5)
        tol = 1e-5 * np.abs(w[i]).sum() * max(abs(lo), abs(hi))
        assert w[i] @ (t[i] + d[i]) == pytest.approx(b[i], abs=tol)
        assert (t[i] + d[i] >= lo - 1e-6).all() and (t[i] + d[i] <= hi + 1e-6).all()
        assert (d[i][w[i] == 0] == 0).all()
    if dim > 1:
        assert 0 < infeasible < rows  # both branches exercised


def test_linf_projection_by_hand():
    # w = 1, t = 0.5 everywhere, b = w·t - 0.4 over 4 coordinates: every
    # coordinate moves by -0.1. With coordinate 0 at the lower face (t = 0),
    # the other three move by -0.4/3 each.
    d = _project_linf_hyperplane(
        np.array([[0.5] * 4, [0.0, 0.5, 0.5, 0.5]], np.float32),
        np.ones([2, 4], np.float32),
        np.array([1.6, 1.1], np.float32),
    ).numpy()
    np.testing.assert_allclose(d[0], [-0.1] * 4, atol=1e-6)
    np.testing.assert_allclose(d[1], [0.0] + [-0.4 / 3] * 3, atol=1e-6)


# ---------------------------------------------------------------------- FAB-T


def test_fab_t_finds_exactly_the_examples_closer_than_epsilon():
    model, images, labels = linear_problem(seed=0, n=120)
    dist = model.min_linf_distance(images, labels)
    eps = float(np.median(dist))
    assert dist.max() < 0.3  # the closed form holds (box constraints inactive)
    # One clean example misclassified on purpose: counted fooled, returned as is.
    wrong = 7
    labels = labels.copy()
    labels[wrong] = (labels[wrong] + 1) % NUM_CLASSES
    adv = fab_t(model, images, labels, epsilon=eps).numpy()
    fooled = model.numpy_logits(adv).argmax(1) != labels
    norms = linf(adv, images)

    assert fooled[wrong] and (adv[wrong] == images[wrong]).all()
    right = np.arange(len(labels)) != wrong
    # None beyond ε; all of those clearly inside (FAB converges to the
    # boundary from outside, within a fraction of a percent here).
    assert not fooled[right & (dist > eps)].any()
    assert fooled[right & (dist < 0.99 * eps)].all()
    assert (right & (dist < 0.99 * eps)).sum() >= 50
    # No adversarial beats the closed-form minimum; all are within ε.
    assert (norms[fooled & right] >= dist[fooled & right] * (1 - 1e-4)).all()
    assert norms.max() <= eps + 1e-6
    # Nothing found: the clean image.
    np.testing.assert_array_equal(adv[~fooled], images[~fooled])
    assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_fab_t_restarts_boxes_and_determinism():
    # Images touching 0 and 1, two restarts (random starts) and a non-default box.
    model, images, labels = linear_problem(seed=1, n=40)
    images[:, 0, :, 0] = 0.0
    images[:, 1, :, 0] = 1.0
    labels = model.numpy_logits(images).argmax(1).astype(np.int32)
    eps = float(np.median(model.min_linf_distance(images, labels)))
    kwargs = dict(epsilon=eps, steps=20, restarts=2, n_target_classes=3, seed=5)
    adv = fab_t(model, images, labels, **kwargs).numpy()
    assert linf(adv, images).max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert 0 < (model.numpy_logits(adv).argmax(1) != labels).sum() < len(labels)
    # Same seed, same images, in an outer tf.function too.
    again = tf.function(lambda x, y: fab_t(model, x, y, **kwargs))(images, labels).numpy()
    np.testing.assert_array_equal(adv, again)
    # A box [-1, 2] around the same images: stays within the box and the ball.
    adv_box = fab_t(model, images, labels, clip_min=-1.0, clip_max=2.0, **kwargs).numpy()
    assert linf(adv_box, images).max() <= eps + 1e-6
    assert adv_box.min() >= -1.0 and adv_box.max() <= 2.0


# --------------------------------------------------------------------- Square


def test_square_catches_gradient_masking():
    # PGD gets no gradient through the quantiser and only its random start
    # moves; Square needs only the logits.
    model = LinearModel(seed=2, masked=True)
    rng = np.random.RandomState(3)
    images = rng.uniform(0.3, 0.7, (400, *SHAPE)).astype(np.float32)
    labels = model.numpy_logits(images).argmax(1).astype(np.int32)
    dist = model.min_linf_distance(images, labels)
    eps = 0.05
    # Examples whose closest adversarial needs between 30% and 70% of ε.
    keep = (dist > 0.3 * eps) & (dist < 0.7 * eps)
    images, labels = images[keep][:60], labels[keep][:60]
    assert len(labels) == 60

    def accuracy(adv):
        return np.mean(np.asarray(model(adv)).argmax(1) == labels)

    assert accuracy(images) == 1.0
    pgd_adv = pgd(model, images, labels, epsilon=eps, step_size=eps / 4, steps=10)
    square_adv = square(model, images, labels, epsilon=eps, queries=1000).numpy()
    assert accuracy(pgd_adv) >= 0.8
    assert accuracy(square_adv) <= 0.05
    assert linf(square_adv, images).max() <= eps + 1e-6


def test_square_ball_range_misclassified_and_determinism():
    model, images, labels = linear_problem(seed=4, n=64)
    images[:, 0, :, 0] = 0.0  # pixels on the faces of [0, 1]
    images[:, 7, :, 0] = 1.0
    labels = model.numpy_logits(images).argmax(1).astype(np.int32)
    wrong = 3
    labels[wrong] = (labels[wrong] + 1) % NUM_CLASSES
    eps = float(np.median(model.min_linf_distance(images, labels)))
    kwargs = dict(epsilon=eps, queries=300, restarts=2, seed=1)
    adv = square(model, images, labels, **kwargs).numpy()
    assert linf(adv, images).max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    np.testing.assert_array_equal(adv[wrong], images[wrong])
    fooled = model.numpy_logits(adv).argmax(1) != labels
    assert fooled[wrong] and 0 < fooled.sum() < len(labels)
    # Same seed: same images, eagerly and inside a tf.function; another seed differs.
    again = tf.function(lambda x, y: square(model, x, y, **kwargs))(images, labels).numpy()
    np.testing.assert_array_equal(adv, again)
    other = square(model, images, labels, **{**kwargs, "seed": 2}).numpy()
    assert not np.array_equal(adv, other)


@pytest.mark.parametrize("attack", [fab_t, square])
def test_nothing_to_attack_never_calls_the_model_on_zero_images(attack):
    model, images, labels = linear_problem(seed=5, n=6)
    wrong = (labels + 1) % NUM_CLASSES  # every clean image misclassified
    np.testing.assert_array_equal(attack(model, images, wrong, epsilon=0.1), images)
    empty = attack(model, images[:0], labels[:0], epsilon=0.1)
    assert empty.shape == (0, *SHAPE)
    # Inside a tf.function, with the batch size unknown when tracing.
    traced = tf.function(
        lambda x, y: attack(model, x, y, epsilon=0.1),
        input_signature=[tf.TensorSpec([None, *SHAPE]), tf.TensorSpec([None], tf.int32)],
    )
    assert traced(images[:0], labels[:0]).shape == (0, *SHAPE)
    np.testing.assert_array_equal(traced(images, wrong), images)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "attack, kwargs, message",
    [
        (fab_t, dict(epsilon=-0.1), "epsilon"),
        (fab_t, dict(epsilon=0.1, steps=0), "steps"),
        (fab_t, dict(epsilon=0.1, restarts=1.5), "restarts"),
        (fab_t, dict(epsilon=0.1, n_target_classes=0), "n_target_classes"),
        (fab_t, dict(epsilon=0.1, beta=0.0), "beta"),
        (fab_t, dict(epsilon=0.1, clip_min=1.0, clip_max=0.0), "clip_min"),
        (square, dict(epsilon=-0.1), "epsilon"),
        (square, dict(epsilon=0.1, queries=-1), "queries"),
        (square, dict(epsilon=0.1, p_init=0.0), "p_init"),
        (square, dict(epsilon=0.1, restarts=0), "restarts"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(attack, kwargs, message):
    model, images, labels = linear_problem(seed=0, n=2)
    with pytest.raises(ValueError, match=message) as info:
        attack(model, images, labels, **kwargs)
    assert "\n" not in str(info.value)


def test_square_needs_nhwc_images():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        square(lambda x: x, np.zeros([2, 64], np.float32), [0, 1], epsilon=0.1)
