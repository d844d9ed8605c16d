"""The L∞ Square Attack (Andriushchenko et al., ECCV 2020): score-based, no gradients.

Random search on the margin loss z_y - max_{j≠y} z_j: it starts from vertical
stripes of ±ε and, at each query, sets one random square window of the image
to x ± ε (one sign per channel), keeping the change if it lowers the margin.
The window's area is a fraction p of the image that shrinks on a fixed
schedule. Needing only the logits, it is not fooled by masked or obfuscated
gradients, which is why AutoAttack runs it last.

The port follows AutoAttack's `autoattack/square.py` (`SquareAttack`, L∞
branch of `attack_single_run`, `p_selection`, `perturb`) at
github.com/fra31/auto-attack, commit a392200 (line numbers below refer to it).
"""

from __future__ import annotations

import functools
import numbers

import tensorflow as tf

from tf_free.attacks.core import _check_budget, _fooled, _is_int, cw_loss
from tf_free.attacks.fab import _unless_empty

# Query counts (on a 10,000-query scale) after which p halves: square.py
# `p_selection` (lines 192-219).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def _p_selection(query, queries, p_init, rescale=True):
    """Fraction p of the image that the square covers at query `query` (0-based).

    `p_selection` of AutoAttack's square.py (lines 192-219): p_init, halved
    after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 queries. With
    `rescale` (the reference's `resc_schedule=True`, and the paper's code),
    these counts are on a 10,000-query scale: query i counts as
    int(i / queries * 10000).

    Args:
      query: int or int tensor, the 0-based query index.
      queries: the attack's query budget.
      p_init: p at the first queries.
      rescale: rescale the schedule to `queries`.

    Returns:
      p as a float64 scalar tensor.
    """
    it = tf.cast(query, tf.float64)
    if rescale:
        it = tf.floor(it / queries * 10000)
    halvings = tf.reduce_sum(tf.cast(it > tf.constant(_P_HALVINGS, tf.float64), tf.float64))
    return p_init / tf.pow(tf.constant(2.0, tf.float64), halvings)


def _square_size(p, height, width, channels):
    """Side of the square: max(round(sqrt(p·n_features / c)), 1), at most min(h, w).

    Rounds half to even, as Python's `round` in the reference.
    """
    side = tf.round(tf.sqrt(p * float(height * width * channels) / channels))
    return tf.cast(tf.clip_by_value(side, 1.0, float(min(height, width))), tf.int32)


def _margin(logits, labels):
    # The reference's margin loss z_y - max_{j≠y} z_j (negative once fooled).
    return -cw_loss(labels, logits)


def _square_single_run(
    model, x, labels, *, epsilon, queries, p_init, rescale, clip_min, clip_max, seed
):
    """One Square Attack run: 1 + `queries` forward passes at most.

    L∞ branch of `attack_single_run` in AutoAttack's square.py (lines 233-304).
    Each query evaluates only the examples not fooled yet (the reference's
    idx_to_fool); they leave the batch once fooled.

    Returns:
      (fooled [M] bool, images [M, H, W, C]: the first fooling image, else
      the lowest-margin one, margin [M] of the returned images).
    """
    m = tf.shape(x)[0]
    _, height, width, channels = x.shape
    # Vertical stripes: one random sign per column and channel.
    stripes = tf.random.stateless_uniform(
        [m, 1, width, channels], seed=tf.random.experimental.stateless_fold_in(seed, 0)
    )
    x_best = tf.clip_by_value(x + epsilon * tf.where(stripes < 0.5, -1.0, 1.0), clip_min, clip_max)
    logits = tf.cast(model(x_best), tf.float32)
    margin_best = _margin(logits, labels)
    fooled = _fooled(logits, labels)
    rows = tf.range(height)[None, :, None, None]
    cols = tf.range(width)[None, None, :, None]

    def retire(now_fooled, pos, x_a, y_a, best_a, margin_a, out, out_margin, fooled):
        # Fooled examples are done: written out, and dropped from the batch.
        done = tf.boolean_mask(pos, now_fooled)[:, None]
        out = tf.tensor_scatter_nd_update(out, done, tf.boolean_mask(best_a, now_fooled))
        out_margin = tf.tensor_scatter_nd_update(
            out_margin, done, tf.boolean_mask(margin_a, now_fooled)
        )
        fooled = tf.tensor_scatter_nd_update(fooled, done, tf.ones_like(done[:, 0], tf.bool))
        kept = [tf.boolean_mask(v, ~now_fooled) for v in (pos, x_a, y_a, best_a, margin_a)]
        return (*kept, out, out_margin, fooled)

    def query(i, pos, x_a, y_a, best_a, margin_a, out, out_margin, fooled):
        n_a = tf.shape(pos)[0]
        side = _square_size(_p_selection(i, queries, p_init, rescale), height, width, channels)
        key = tf.random.experimental.stateless_fold_in(seed, i + 1)
        keys = tf.random.experimental.stateless_split(key, 3)
        # Window and signs drawn per example (the reference draws one window
        # and one sign per channel for the whole batch at each query).
        top = tf.random.stateless_uniform(
            [n_a], seed=keys[0], minval=0, maxval=height - side + 1, dtype=tf.int32
        )
        left = tf.random.stateless_uniform(
            [n_a], seed=keys[1], minval=0, maxval=width - side + 1, dtype=tf.int32
        )
        signs = tf.where(
            tf.random.stateless_uniform([n_a, 1, 1, channels], seed=keys[2]) < 0.5, -1.0, 1.0
        )
        top = top[:, None, None, None]
        left = left[:, None, None, None]
        window = ((rows >= top) & (rows < top + side)) & ((cols >= left) & (cols < left + side))
        # x_best + 2ε·sign clipped to the ε-ball is x + ε·sign in the window.
        x_new = tf.where(
            window, tf.clip_by_value(x_a + epsilon * signs, clip_min, clip_max), best_a
        )
        logits = tf.cast(model(x_new), tf.float32)
        margin = _margin(logits, y_a)
        now_fooled = _fooled(logits, y_a)
        improved = (margin < margin_a) | now_fooled
        best_a = tf.where(improved[:, None, None, None], x_new, best_a)
        margin_a = tf.where(improved, margin, margin_a)
        state = (pos, x_a, y_a, best_a, margin_a, out, out_margin, fooled)
        # Most queries fool nobody: then the batch stays as it is.
        state = tf.cond(
            tf.reduce_any(now_fooled),
            lambda: retire(now_fooled, *state),
            lambda: state,
        )
        return (i + 1, *state)

    def going(i, pos, *_):
        return (i < queries) & (tf.size(pos) > 0)

    pos = tf.cast(tf.where(~fooled)[:, 0], tf.int32)
    unknown = tf.TensorShape([None])
    _, pos, _, _, best_a, margin_a, out, out_margin, fooled = tf.while_loop(
        going,
        query,
        (
            tf.constant(0),
            pos,
            tf.gather(x, pos),
            tf.gather(labels, pos),
            tf.gather(x_best, pos),
            tf.gather(margin_best, pos),
            x_best,
            margin_best,
            fooled,
        ),
        shape_invariants=(
            tf.TensorShape([]),
            unknown,
            unknown.concatenate(x.shape[1:]),
            unknown,
            unknown.concatenate(x.shape[1:]),
            unknown,
            x_best.shape,
            margin_best.shape,
            fooled.shape,
        ),
    )
    # The examples still robust at the end keep their lowest-margin image.
    out = tf.tensor_scatter_nd_update(out, pos[:, None], best_a)
    out_margin = tf.tensor_scatter_nd_update(out_margin, pos[:, None], margin_a)
    return fooled, out, out_margin


def _square_graph(
    model, images, labels, seed, *, epsilon, queries, p_init, restarts, rescale, clip_min, clip_max
):
    logits = tf.cast(model(images), tf.float32)
    fooled = _fooled(logits, labels)
    seed = tf.cast(seed, tf.int64)

    def run(restart, fooled, adv, best_margin):
        # As `perturb` (square.py lines 549-614): each restart attacks the
        # examples not fooled so far.
        index = tf.where(~fooled)[:, 0]
        found, x_adv, margin = _square_single_run(
            model,
            tf.gather(images, index),
            tf.gather(labels, index),
            epsilon=epsilon,
            queries=queries,
            p_init=p_init,
            rescale=rescale,
            clip_min=clip_min,
            clip_max=clip_max,
            seed=tf.stack([seed, tf.cast(restart, tf.int64)]),
        )
        # Unlike the reference, which returns the clean image, an example no
        # restart fools gets its lowest-margin image (as `pgd` does).
        better = found | (margin < tf.gather(best_margin, index))
        hit = tf.boolean_mask(index, better)[:, None]
        adv = tf.tensor_scatter_nd_update(adv, hit, tf.boolean_mask(x_adv, better))
        best_margin = tf.tensor_scatter_nd_update(best_margin, hit, tf.boolean_mask(margin, better))
        done = tf.boolean_mask(index, found)[:, None]
        fooled = tf.tensor_scatter_nd_update(fooled, done, tf.ones_like(done[:, 0], tf.bool))
        return restart + 1, fooled, adv, best_margin

    # A tf.while_loop over the restarts: the graph holds one run, and a
    # restart with nothing left to fool never calls the model on 0 images.
    _, _, adv, _ = tf.while_loop(
        lambda restart, fooled, *_: (restart < restarts) & ~tf.reduce_all(fooled),
        run,
        (tf.constant(0), fooled, images, tf.fill(tf.shape(labels), float("inf"))),
    )
    return adv


def square(
    model,
    images,
    labels,
    *,
    epsilon: float,
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed=0,
    rescale_schedule: bool = True,
) -> tf.Tensor:
    """L∞ Square Attack (Andriushchenko et al., ECCV 2020), margin loss.

    Score-based random search: starts from vertical stripes of ±ε, then each
    query overwrites a random square window with x ± ε (a random sign per
    channel) and keeps the change when the margin z_y - max_{j≠y} z_j drops;
    the window covers a fraction p of the image (`_p_selection`). An example
    stops as soon as it is misclassified (the queries stop once all are), and
    each query runs `model` once on the examples not fooled yet.

    Args:
      model: callable mapping images to logits.
      images: float images [N, H, W, C] in [clip_min, clip_max] (H, W, C
        known when tracing).
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      queries: queries per restart after the initial one (the reference's
        n_queries).
      p_init: initial fraction of the image covered by the square.
      restarts: independent runs, each on the examples not fooled so far.
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      seed: int or int tensor; all randomness is stateless, from (seed, restart).
      rescale_schedule: rescale the p schedule to `queries` (the paper's
        code, and AutoAttack's `resc_schedule=True`); AutoAttack's standard
        version passes False (with 5000 queries p then halves at the raw
        query counts and never goes below p_init/128).

    Returns:
      Images [N, H, W, C] in the ε-ball and the valid range: the first image
      that fools the model, else the lowest-margin image found. Clean
      images that are already misclassified are returned unchanged.
    """
    _check_budget(epsilon, restarts=restarts, clip_min=clip_min, clip_max=clip_max)
    if not (_is_int(queries) and queries >= 0):
        raise ValueError(f"queries must be an integer >= 0, got {queries!r}")
    if not (isinstance(p_init, numbers.Real) and 0 < p_init <= 1):
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    if images.shape.rank != 4 or None in images.shape[1:]:
        raise ValueError(f"images must be [N, H, W, C] with known H, W, C, got {images.shape}")
    run = functools.partial(
        _square_graph,
        model,
        epsilon=epsilon,
        queries=queries,
        p_init=float(p_init),
        restarts=restarts,
        rescale=bool(rescale_schedule),
        clip_min=clip_min,
        clip_max=clip_max,
    )
    if tf.executing_eagerly():
        # Eagerly, tf.while_loop would run as a Python loop: trace it once.
        run = tf.function(run)
    return _unless_empty(run, images, labels, tf.convert_to_tensor(seed))
