"""Targeted FAB (fast adaptive boundary attack), L∞, as AutoAttack runs it.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020. FAB looks for the adversarial example of smallest
norm: each step linearises the decision boundary between the true class and a
target class, projects both the current point and the clean image onto that
hyperplane (within the valid box), and moves to a convex combination of the two
projections, slightly past the boundary. Once a point is adversarial it is
pulled back towards the clean image, so the norm shrinks over the steps.

The port follows AutoAttack's PyTorch code (github.com/fra31/auto-attack at
commit a392200; line numbers below refer to it):
`fab_projections.py` `projection_linf` for the projection, `fab_base.py`
`attack_single_run` (with `is_targeted=True`) and `perturb` (`targeted=True`)
for the attack, and `fab_pt.py` `get_diff_logits_grads_batch_targeted` for the
gradient. At budget ε an example counts as fooled once FAB finds an adversarial
point with ‖δ‖∞ ≤ ε.
"""

from __future__ import annotations

import functools
import math
import numbers

import tensorflow as tf

from tf_free.attacks.core import _check_budget, _fooled, _is_int


def _project_linf_hyperplane(points, w, b, clip_min=0.0, clip_max=1.0):
    """Smallest-L∞ step from each point onto its hyperplane, inside the box.

    For every row solves min ‖d‖∞ subject to w·(t + d) = b and
    clip_min <= t + d <= clip_max. Where the hyperplane cannot be reached inside
    the box, returns the box corner that gets closest to it. Coordinates with
    w = 0 are left unchanged (d = 0).

    Port of `projection_linf` in AutoAttack's `autoattack/fab_projections.py`
    (lines 7-59), batched the same way: with λ the L∞ radius, w·d(λ) is
    piecewise linear in λ with breakpoints at each coordinate's distance p to
    the box face it moves towards; a sort by p and cumulative sums give w·d at
    every breakpoint, and a bisection over the sorted breakpoints (run on every
    row, where the reference runs it on the rows that need it) finds the
    segment holding the solution. The reference's box is [0, 1]; here it is
    [clip_min, clip_max].

    Args:
      points: [B, D] float points t.
      w: [B, D] hyperplane normals.
      b: [B] hyperplane offsets.
      clip_min: lower bound of the box.
      clip_max: upper bound of the box.

    Returns:
      [B, D] steps d.
    """
    t = tf.convert_to_tensor(points, tf.float32)
    w = tf.convert_to_tensor(w, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    dim = t.shape[-1]
    if dim is None:
        raise ValueError("the number of features per example must be known when tracing")

    # Flips each hyperplane so the point lies on its positive side: the step
    # then has to lower w·t down to b.
    sign = tf.where(tf.reduce_sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
    w = w * sign[:, None]
    b = b * sign

    negative = w < 0
    a = tf.cast(negative, tf.float32)
    nonzero = tf.cast(tf.not_equal(w, 0.0), tf.float32)
    # d: the box corner that lowers w·(t + d) the most; p: each coordinate's
    # distance to that corner (the reference's p = a - t(2a - 1) for the box [0, 1]).
    d = tf.where(negative, clip_max - t, clip_min - t) * nonzero
    p = tf.where(negative, clip_max - t, t - clip_min)

    b = b - tf.reduce_sum(w * t, axis=1)
    b0 = tf.reduce_sum(w * d, axis=1)

    # Breakpoints by decreasing p (the reference's indp2 = argsort(p) flipped):
    # at λ = p_k the k largest steps are capped. top_k gives the sorted p with
    # the order, and the reference's bs2 = -w·d in that order is exactly |w|·p
    # (-w·d = |w|·p coordinate by coordinate), so only |w| needs gathering.
    ps, indp2 = tf.math.top_k(p, k=dim)
    rows = tf.range(tf.shape(p)[0])[:, None] * dim
    ws_abs = tf.gather(tf.reshape(tf.abs(w), [-1]), indp2 + rows)
    s = tf.cumsum(ws_abs, axis=1)
    sb = tf.cumsum(ws_abs * ps, axis=1) + b0[:, None]

    b2 = sb[:, -1] - s[:, -1] * ps[:, -1]
    # c_l: solved with λ below the smallest p (every coordinate capped);
    # c2: solvable inside the box, λ found by bisection; else the corner d.
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & ~c_l

    lb = tf.zeros_like(b, tf.int32)
    ub = tf.fill(tf.shape(b), dim - 1)
    for _ in range(math.ceil(math.log2(dim)) if dim > 1 else 0):
        mid = (lb + ub) // 2
        b2 = tf.gather(sb, mid, batch_dims=1) - tf.gather(s, mid, batch_dims=1) * tf.gather(
            ps, mid, batch_dims=1
        )
        go_up = b - b2 > 0
        lb = tf.where(go_up, mid, lb)
        ub = tf.where(go_up, ub, mid)

    # The denominators are positive on the rows that use them; the floor only
    # keeps the unused rows free of 0/0.
    tiny = 1e-30
    lmbd_l = tf.maximum((b - sb[:, -1]) / -tf.maximum(s[:, -1], tiny), 0.0)[:, None]
    d_l = (2.0 * a - 1.0) * lmbd_l
    s_lb = tf.gather(s, lb, batch_dims=1)
    lmbd_2 = tf.maximum((b - tf.gather(sb, lb, batch_dims=1)) / -tf.maximum(s_lb, tiny), 0.0)
    lmbd_2 = lmbd_2[:, None]
    d_2 = tf.minimum(lmbd_2, d) * a + tf.maximum(-lmbd_2, d) * (1.0 - a)

    d = tf.where(c_l[:, None], d_l, tf.where(c2[:, None], d_2, d))
    return d * nonzero


def _linf_norm(x):
    return tf.reduce_max(tf.abs(tf.reshape(x, [tf.shape(x)[0], -1])), axis=1)


def _fab_single_run(
    model,
    x0,
    labels,
    targets,
    *,
    epsilon,
    steps,
    alpha_max,
    eta,
    beta,
    clip_min,
    clip_max,
    random_start,
    seed,
):
    """One targeted FAB run; per example, the first adversarial within ε.

    Follows `attack_single_run` in AutoAttack's `autoattack/fab_base.py`
    (lines 83-263, `norm='Linf'`, `is_targeted=True`). The reference keeps the
    smallest adversarial over all steps and judges it against ε afterwards;
    here an example leaves the batch as soon as it has an adversarial within ε
    (the same examples end up fooled, as the examples' runs are independent),
    which saves the remaining steps on it.

    Returns:
      (found [M] bool, adversarial images [M, ...] where found, else x0).
    """
    m = tf.shape(x0)[0]
    flat_dim = math.prod(x0.shape[1:])
    # The reference's start at restart > 0: a random point at L∞ distance ε/2
    # (min(res2, eps) with res2 = 1e10 at that time); restart 0 starts at x0.
    noise = tf.random.stateless_uniform(tf.shape(x0), seed=seed, minval=-1.0, maxval=1.0)
    scale = tf.reshape(_linf_norm(noise), [-1] + [1] * (x0.shape.rank - 1))
    x1 = tf.clip_by_value(x0 + 0.5 * epsilon * noise / scale, clip_min, clip_max)
    x1 = tf.where(random_start, x1, x0)

    def step(i, pos, x1, found, best):
        x0_a = tf.gather(x0, pos)
        y_a = tf.gather(labels, pos)
        t_a = tf.gather(targets, pos)
        n_a = tf.shape(pos)[0]
        # get_diff_logits_grads_batch_targeted (fab_pt.py lines 100-114):
        # f = z_target - z_label and its input gradient.
        with tf.GradientTape() as tape:
            tape.watch(x1)
            logits = tf.cast(model(x1), tf.float32)
            df = tf.gather(logits, t_a, batch_dims=1) - tf.gather(logits, y_a, batch_dims=1)
            total = tf.reduce_sum(df)
        dg = tape.gradient(total, x1)
        if dg is None:  # no path from the input to the logits: nothing to follow
            dg = tf.zeros_like(x1)
        # A non-finite gradient or logit (float16 overflow) would turn the
        # iterate into NaNs, which some models reject: such entries count as 0.
        dg = tf.where(tf.math.is_finite(dg), dg, 0.0)
        df = tf.where(tf.math.is_finite(df), df, 0.0)
        w = tf.reshape(dg, [n_a, flat_dim])
        x1_flat = tf.reshape(x1, [n_a, flat_dim])
        x0_flat = tf.reshape(x0_a, [n_a, flat_dim])
        b = -df + tf.reduce_sum(w * x1_flat, axis=1)

        # The current point and the clean image, projected onto the same
        # linearised boundary in one batched call (as the reference does).
        d3 = _project_linf_hyperplane(
            tf.concat([x1_flat, x0_flat], 0),
            tf.concat([w, w], 0),
            tf.concat([b, b], 0),
            clip_min,
            clip_max,
        )
        d1 = tf.reshape(d3[:n_a], tf.shape(x1))
        d2 = tf.reshape(d3[n_a:], tf.shape(x1))
        a0 = tf.maximum(tf.reduce_max(tf.abs(d3), axis=1), 1e-8)
        a1, a2 = a0[:n_a], a0[n_a:]
        alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)
        alpha = tf.reshape(alpha, [-1] + [1] * (x1.shape.rank - 1))
        x1 = tf.clip_by_value(
            (x1 + eta * d1) * (1.0 - alpha) + (x0_a + d2 * eta) * alpha, clip_min, clip_max
        )

        is_adv = _fooled(model(x1), y_a)
        hit = is_adv & (_linf_norm(x1 - x0_a) <= epsilon)
        hit_pos = tf.boolean_mask(pos, hit)[:, None]
        best = tf.tensor_scatter_nd_update(best, hit_pos, tf.boolean_mask(x1, hit))
        found = tf.tensor_scatter_nd_update(found, hit_pos, tf.ones_like(hit_pos[:, 0], tf.bool))

        # Backward step towards the clean image from an adversarial point.
        adv_mask = tf.reshape(is_adv, [-1] + [1] * (x1.shape.rank - 1))
        x1 = tf.where(adv_mask, x0_a + (x1 - x0_a) * beta, x1)
        # Examples with an adversarial within ε are done.
        keep = ~hit
        return i + 1, tf.boolean_mask(pos, keep), tf.boolean_mask(x1, keep), found, best

    def going(i, pos, x1, found, best):
        return (i < steps) & (tf.size(pos) > 0)

    unknown_batch = tf.TensorShape([None]).concatenate(x0.shape[1:])
    _, _, _, found, best = tf.while_loop(
        going,
        step,
        (tf.constant(0), tf.range(m), x1, tf.zeros([m], tf.bool), x0),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None]),
            unknown_batch,
            tf.TensorShape([None]),
            x0.shape,
        ),
    )
    return found, best


def _fab_t_graph(
    model,
    images,
    labels,
    seed,
    *,
    epsilon,
    steps,
    restarts,
    n_target_classes,
    alpha_max,
    eta,
    beta,
    clip_min,
    clip_max,
):
    logits = tf.cast(model(images), tf.float32)
    num_classes = logits.shape[-1]
    if num_classes is not None:
        n_target_classes = min(n_target_classes, num_classes - 1)
    # The reference's la_target = sort(logits)[:, -target_class] for
    # target_class = 2 .. n_target_classes + 1: the most likely wrong classes.
    ranked = tf.math.top_k(logits, k=n_target_classes + 1).indices
    fooled = _fooled(logits, labels)
    seed = tf.cast(seed, tf.int64)

    def run(k, fooled, adv):
        # As `perturb` (fab_base.py lines 265-329, targeted branch): for each
        # target class, then each restart, attack the examples not fooled so far. One
        # tf.while_loop over the runs, so the graph holds a single FAB run.
        target = 1 + k // restarts
        index = tf.where(~fooled)[:, 0]
        x0 = tf.gather(images, index)
        y = tf.gather(labels, index)
        found, x_adv = _fab_single_run(
            model,
            x0,
            y,
            tf.gather(tf.gather(ranked, target, axis=1), index),
            epsilon=epsilon,
            steps=steps,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
            clip_min=clip_min,
            clip_max=clip_max,
            random_start=k % restarts > 0,
            seed=tf.stack([seed, tf.cast(k, tf.int64)]),
        )
        # Re-checked on a fresh forward pass, as the reference does (skipped
        # when nothing was found: some models fail on an empty batch).
        index, x_adv, y = (tf.boolean_mask(v, found) for v in (index, x_adv, y))
        found = tf.cond(
            tf.size(y) > 0,
            lambda: _fooled(model(x_adv), y),
            lambda: tf.zeros([0], tf.bool),
        )
        hit = tf.boolean_mask(index, found)[:, None]
        fooled = tf.tensor_scatter_nd_update(fooled, hit, tf.ones_like(hit[:, 0], tf.bool))
        adv = tf.tensor_scatter_nd_update(adv, hit, tf.boolean_mask(x_adv, found))
        return k + 1, fooled, adv

    _, _, adv = tf.while_loop(
        lambda k, fooled, adv: (k < n_target_classes * restarts) & ~tf.reduce_all(fooled),
        run,
        (tf.constant(0), fooled, images),
    )
    return adv


def fab_t(
    model,
    images,
    labels,
    *,
    epsilon: float,
    steps: int = 100,
    restarts: int = 1,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed=0,
) -> tf.Tensor:
    """Targeted L∞ FAB (Croce & Hein, ICML 2020), as in AutoAttack's "fab-t".

    For each of the `n_target_classes` most likely wrong classes (ranked on
    the clean logits) in turn, runs `restarts` targeted FAB runs of `steps`
    steps on the examples not fooled yet (AutoAttack's `FABAttack.perturb`
    with `targeted=True`, `autoattack/fab_base.py`; the standard AutoAttack
    runs steps=100, restarts=1, n_target_classes=9). Restart 0 starts at the
    clean image, later ones at a random point at distance ε/2. An example is
    fooled once a run reaches an adversarial point with ‖δ‖∞ <= ε; it then
    leaves the batch, so fooled examples cost no more steps.

    Each step costs one forward and backward pass and one forward pass of
    `model`, on the examples still in play.

    Args:
      model: callable mapping images to logits.
      images: float images [N, ...] in [clip_min, clip_max] (feature
        dimensions known when tracing).
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      steps: FAB steps per run (the reference's n_iter).
      restarts: runs per target class (the reference's n_restarts).
      n_target_classes: number of target classes, the most likely wrong
        classes first; capped at the number of classes - 1.
      alpha_max: largest weight of the clean image's projection in a step.
      eta: overshoot factor of the projections.
      beta: backward-step factor towards the clean image once adversarial.
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      seed: int or int tensor for the random starts of restarts > 0.

    Returns:
      Images [N, ...]: the adversarial point found within ε, or the clean
      image where none was found (and where the clean image is already
      misclassified).
    """
    _check_budget(epsilon, steps=steps, restarts=restarts, clip_min=clip_min, clip_max=clip_max)
    if not (_is_int(n_target_classes) and n_target_classes >= 1):
        raise ValueError(f"n_target_classes must be an integer >= 1, got {n_target_classes!r}")
    for name, value, ok in (
        ("alpha_max", alpha_max, lambda v: 0 <= v <= 1),
        ("eta", eta, lambda v: v > 0),
        ("beta", beta, lambda v: 0 < v <= 1),
    ):
        if not (isinstance(value, numbers.Real) and ok(value)):
            raise ValueError(f"{name} out of range, got {value!r}")
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    if images.shape.rank is not None and images.shape.rank < 2:
        raise ValueError(f"images must be batched [N, ...], got shape {images.shape}")
    if None in images.shape[1:]:
        raise ValueError(f"images need known feature dimensions, got shape {images.shape}")
    run = functools.partial(
        _fab_t_graph,
        model,
        epsilon=epsilon,
        steps=steps,
        restarts=restarts,
        n_target_classes=n_target_classes,
        alpha_max=float(alpha_max),
        eta=float(eta),
        beta=float(beta),
        clip_min=clip_min,
        clip_max=clip_max,
    )
    if tf.executing_eagerly():
        # Eagerly, tf.while_loop would run as a Python loop: trace it once.
        run = tf.function(run)
    return _unless_empty(run, images, labels, tf.convert_to_tensor(seed))


def _unless_empty(run, images, labels, seed):
    """run(images, labels, seed), or `images` for an empty batch.

    Some models (oneDNN convolutions in a SavedModel) fail on a batch of 0.
    """
    if images.shape[0] is not None:
        return run(images, labels, seed) if images.shape[0] > 0 else images
    return tf.cond(
        tf.shape(images)[0] > 0, lambda: run(images, labels, seed), lambda: tf.identity(images)
    )
