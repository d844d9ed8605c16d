"""APGD and targeted APGD (Croce & Hein, ICML 2020), L∞, natively in TF.

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (arXiv:2003.01690), Alg. 1, ported from the reference
PyTorch code, `autoattack/autopgd_base.py` in fra31/auto-attack (commit a392200):
`APGDAttack.attack_single_run` (L201-L443), `APGDAttack.perturb` (L445-L524),
`APGDAttack_targeted.perturb` (L606-L686), the losses `dlr_loss` (L191-L197) and
`dlr_loss_targeted` (L595-L600).

Same contract as `tf_free.attacks.pgd`: `model` is any callable mapping float
images in [clip_min, clip_max] to logits (a Keras model or a SavedModel's
`serve`), images are [N, H, W, C], labels are integers, and the result is a
batch of adversarial images in the ε-ball and the valid range. Every function
runs eagerly or inside a `tf.function` (dynamic batch sizes included).
"""

from __future__ import annotations

import functools

import tensorflow as tf

from tf_free.attacks.core import (
    _check_budget,
    _fooled,
    _is_better,
    _is_int,
    _logits_loss_grad,
    _select,
    cross_entropy_loss,
    gradient_sign,
)

APGD_LOSSES = ("ce", "dlr")
# No Python control flow depends on tensors here (loops are tf.while_loop), so
# AutoGraph is skipped: converting these functions made tracing 10x slower.
_graph_only = tf.autograph.experimental.do_not_convert
# Alg. 1: the fraction of steps that must raise the loss between two
# checkpoints (ρ) and the momentum α (autopgd_base.py L115 `rho=.75`, L326).
RHO = 0.75
MOMENTUM = 0.75
# Added to the DLR denominators, as in the reference (L197, L600).
DLR_EPSILON = 1e-12


def _num_classes(logits: tf.Tensor, needed: int, what: str) -> None:
    classes = logits.shape[-1]
    if classes is not None and classes < needed:
        raise ValueError(f"{what} needs at least {needed} classes, got logits with {classes}")


def _one_hot(labels, logits):
    labels = tf.cast(labels, tf.int32)
    return tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)


def _pick(mask, logits):
    """z_y from a one-hot mask; tf.where, not a product, so infinite logits are fine."""
    return tf.reduce_sum(tf.where(mask, logits, 0.0), axis=-1)


def dlr_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example Difference of Logits Ratio loss (Sec. 4 of the paper).

    DLR(z, y) = -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12), with z_π1 ≥ z_π2 ≥
    ... the sorted logits: the CW margin divided by a scale of the logits, so it
    is invariant to shifting and rescaling them. Matches `APGDAttack.dlr_loss`
    (autopgd_base.py L191-L197). Positive exactly when the example is
    misclassified.

    Args:
      labels: integer labels [N].
      logits: logits [N, C], C >= 3 (any float dtype; computed in float32).

    Returns:
      float32 [N].
    """
    logits = tf.cast(logits, tf.float32)
    _num_classes(logits, 3, "the DLR loss")
    is_true = _one_hot(labels, logits)
    correct = _pick(is_true, logits)
    # max_{i≠y} z_i by masking (as cw_loss): the same value as the reference's
    # "second largest if the largest is y, else the largest", ties included.
    wrong = tf.reduce_max(tf.where(is_true, -float("inf"), logits), axis=-1)
    top = tf.math.top_k(logits, k=3).values
    return -(correct - wrong) / (top[:, 0] - top[:, 2] + DLR_EPSILON)


def targeted_dlr_loss(labels: tf.Tensor, logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Per-example targeted DLR loss, to be maximised (Sec. 4 of the paper).

    -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12), with t the target class;
    matches `APGDAttack_targeted.dlr_loss_targeted` (autopgd_base.py L595-L600).

    Args:
      labels: integer labels [N].
      logits: logits [N, C], C >= 4 (any float dtype; computed in float32).
      targets: integer target classes [N].

    Returns:
      float32 [N].
    """
    logits = tf.cast(logits, tf.float32)
    _num_classes(logits, 4, "the targeted DLR loss")
    correct = _pick(_one_hot(labels, logits), logits)
    target = _pick(_one_hot(targets, logits), logits)
    top = tf.math.top_k(logits, k=4).values
    return -(correct - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_EPSILON)


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations w_j at which APGD may halve its step (Sec. 3.2 of the paper).

    The paper defines p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} -
    0.03, 0.06) and w_j = ceil(p_j · steps). This follows the reference's integer
    version (autopgd_base.py L153-L155, L298, L405, L424): the first interval is
    max(int(0.22 · steps), 1) steps, each next one max(int(0.03 · steps), 1) steps
    shorter, but at least max(int(0.06 · steps), 1). Both agree for steps = 100:
    [0, 22, 41, 57, 70, 80, 87, 93, 99].

    Args:
      steps: number of iterations, >= 1.

    Returns:
      The checkpoints, starting with 0, all <= steps.
    """
    if not (_is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    interval = max(int(0.22 * steps), 1)
    shrink = max(int(0.03 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    points = [0]
    while points[-1] + interval <= steps:
        points.append(points[-1] + interval)
        interval = max(interval - shrink, shortest)
    return points


@_graph_only
def _apgd_run(model, images, labels, *, loss_fn, epsilon, steps, clip_min, clip_max, seed):
    """One APGD run on every example of the batch (`attack_single_run`, L∞).

    Returns, per example, the first of: an iterate that fools the model (the
    highest-loss one), else the highest-loss iterate (the random start counts).
    """
    n = tf.shape(images)[0]
    checkpoints = apgd_checkpoints(steps)
    # window[i] = steps since the previous checkpoint if step i+1 is one, else 0.
    window = [0.0] * steps
    for previous, current in zip(checkpoints, checkpoints[1:]):
        window[current - 1] = float(current - previous)
    window = tf.constant(window, tf.float32)

    # Random start in the ball (L206-L209): x + ε·t/‖t‖∞, t uniform in [-1, 1]^d.
    # One t for the whole batch (see `apgd`), so an example's result does not
    # depend on the other examples of its batch.
    t = 2.0 * tf.random.stateless_uniform(tf.shape(images)[1:], seed=seed) - 1.0
    t = t / (tf.reduce_max(tf.abs(t)) + 1e-12)
    x_adv = tf.clip_by_value(images + epsilon * t[None], clip_min, clip_max)

    # The ε-ball within the box, once: clipping to it equals clipping to the ball,
    # then to the box (L330-L334), and saves 4 of 6 ops per projection.
    lower = tf.maximum(images - epsilon, clip_min)
    upper = tf.minimum(images + epsilon, clip_max)

    def project(x):
        return tf.minimum(tf.maximum(x, lower), upper)

    def evaluate(x):
        logits, losses, grad = _logits_loss_grad(model, x, labels, loss_fn)
        return _fooled(logits, labels), losses, grad

    fooled, losses, grad = evaluate(x_adv)
    # The returned candidate (`x_best_adv` and `x_best` of the reference, L231-L232).
    result = (x_adv, fooled, losses)
    # The highest-loss point, its loss and gradient (L395-L400).
    best = (x_adv, losses, grad)
    state = dict(
        x_adv=x_adv,
        x_old=x_adv,
        grad=grad,
        step=tf.fill([n], 2.0 * epsilon),  # L293-L295: η = 2ε
        # Loss increases since the last checkpoint (check_oscillation, L166-L171).
        increases=tf.zeros([n]),
        # The reference compares the first step's loss with loss_steps[-1], a
        # row not yet written (0), not with the start's loss (L169, i = 0).
        previous_loss=tf.zeros([n]),
        best_at_check=losses,  # loss_best_last_check (L314)
        reduced_at_check=tf.ones([n], tf.bool),  # reduced_last_check (L315)
    )

    def step(i, state, result, best):
        x_adv, x_old, grad, step_size = state["x_adv"], state["x_old"], state["grad"], state["step"]
        size = tf.reshape(step_size, [-1] + [1] * (len(images.shape) - 1))
        # L326-L334: no momentum at the first step, then 0.75.
        alpha = tf.where(i > 0, MOMENTUM, 1.0)
        z = project(x_adv + size * gradient_sign(grad))
        x_new = project(x_adv + alpha * (z - x_adv) + (1.0 - alpha) * (x_adv - x_old))
        fooled, losses, grad = evaluate(x_new)
        result_adv, result_fooled, result_losses = result
        better = _is_better(fooled, losses, result_fooled, result_losses)
        result = (
            _select(better, x_new, result_adv),
            tf.where(better, fooled, result_fooled),
            tf.where(better, losses, result_losses),
        )
        best_x, best_losses, best_grad = best
        improved = losses > best_losses  # L397
        best = (
            _select(improved, x_new, best_x),
            tf.where(improved, losses, best_losses),
            _select(improved, grad, best_grad),
        )
        increases = state["increases"] + tf.cast(losses > state["previous_loss"], tf.float32)

        # Checkpoint (L405-L424): halve η where the loss rose in at most ρ of
        # the steps since the last checkpoint (condition 1), or where neither η
        # nor the best loss changed since then (condition 2); restart those
        # examples from their best point, with its gradient.
        at_check = window[i] > 0
        oscillating = increases <= window[i] * RHO
        stalled = ~state["reduced_at_check"] & (state["best_at_check"] >= best[1])
        reduce = (oscillating | stalled) & at_check
        state = dict(
            x_adv=_select(reduce, best[0], x_new),
            x_old=x_adv,
            grad=_select(reduce, best[2], grad),
            step=tf.where(reduce, step_size / 2.0, step_size),
            increases=tf.where(at_check, 0.0, increases),
            previous_loss=losses,
            best_at_check=tf.where(at_check, best[1], state["best_at_check"]),
            reduced_at_check=tf.where(at_check, reduce, state["reduced_at_check"]),
        )
        return i + 1, state, result, best

    def keep_going(i, state, result, best):
        # Once every example is fooled, more steps cannot unfool any.
        return (i < steps) & ~tf.reduce_all(result[1])

    _, _, result, _ = tf.while_loop(keep_going, step, (tf.constant(0), state, result, best))
    return result[0]


@_graph_only
def _attack_robust(model, images, labels, adv, fooled, score, run, score_fn):
    """Runs `run(x, y, index)` on the examples not yet fooled; keeps the worse case.

    The clean image of an example the model gets wrong stays its result (the
    reference attacks only the correctly classified ones, L501-L517), and so does
    any earlier result that fools. Otherwise the new result replaces the old one
    if it fools, or has a higher `score_fn(y, logits)`.
    """
    index = tf.where(~fooled)[:, 0]
    x, y = tf.gather(images, index), tf.gather(labels, index)
    new = run(x, y, index)
    logits = model(new)
    new_fooled = _fooled(logits, y)
    new_score = score_fn(y, logits)
    better = _is_better(new_fooled, new_score, tf.gather(fooled, index), tf.gather(score, index))
    index = tf.boolean_mask(index, better)[:, None]
    return (
        tf.tensor_scatter_nd_update(adv, index, tf.boolean_mask(new, better)),
        tf.tensor_scatter_nd_update(fooled, index, tf.boolean_mask(new_fooled, better)),
        tf.tensor_scatter_nd_update(score, index, tf.boolean_mask(new_score, better)),
    )


def _skip_empty(attack):
    """attack(...), or the images as they are when the batch is empty.

    A SavedModel's convolutions fail on an empty batch, so the model is never
    called on one (the ensemble passes only the examples still robust).
    """

    @functools.wraps(attack)
    def wrapper(model, images, labels, **kwargs):
        return tf.cond(
            tf.shape(images)[0] > 0,
            lambda: attack(model, images, labels, **kwargs),
            lambda: images,
        )

    return wrapper


def _call(attack, model, images, labels, **kwargs):
    """attack(model, images, labels, **kwargs) on tensors, compiled when called eagerly."""
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    kwargs["seed"] = tf.cast(kwargs["seed"], tf.int64)
    if tf.executing_eagerly():
        # Eagerly, every op of the 100-900 steps would be dispatched from
        # Python (~20x slower); the compiled graph is cached per model and
        # per Python argument (one trace per model and setting).
        attack = _COMPILED[attack]
    return attack(model, images, labels, **kwargs)


@_graph_only
def apgd(
    model,
    images,
    labels,
    *,
    epsilon: float,
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed=0,
) -> tf.Tensor:
    """Auto-PGD (APGD, Alg. 1 of Croce & Hein 2020), L∞, on the CE or DLR loss.

    Step size 2ε, halved at the checkpoints of `apgd_checkpoints` when the loss
    rose in at most ρ = 0.75 of the steps since the last one, or when neither the
    step nor the best loss changed since then; the halved examples restart from
    their best point. Momentum 0.75 (none at the first step). As in
    `APGDAttack.perturb` (autopgd_base.py L445-L524), only correctly classified
    examples are attacked, and each restart attacks those still not fooled.

    Where this differs from the reference, and why:
    - The random start x + ε·t/‖t‖∞ (t uniform in [-1, 1]^d, L207-L209) uses
      one t for the whole batch, drawn from the stateless seed (seed, restart):
      an example's result then depends only on itself and the seed, not on the
      batch it shares, so runs are reproducible across batch sizes and an
      ensemble attacking only the robust examples fools at least what each of
      its attacks alone fools.
    - Where no iterate fools, it returns the highest-loss point instead of the
      clean image; where several fool, the highest-loss one instead of the last.
      Who is fooled is the same.
    - It stops once every example of the batch is fooled (not fewer fooled).
    - Signs of non-finite gradients are 0; the input gradient is rescaled per
      example by a power of two (exact; see `tf_free.attacks.core`) so that
      float16 models do not underflow it. Loss values are not rescaled.
    Kept from the reference, unlike the paper: condition 1 counts a step as an
    increase when its loss is strictly above the previous step's, compares the
    first step with 0 rather than with the start (L169), and halves when at most
    (not fewer than) ρ of the steps increased; the checkpoints are integer.

    Args:
      model: callable mapping images to logits.
      images: float images [N, H, W, C] in [clip_min, clip_max].
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      steps: iterations per restart (N_iter; 100 in AutoAttack).
      restarts: runs on the examples still not fooled.
      loss: "ce" (cross-entropy) or "dlr" (`dlr_loss`, needs >= 3 classes).
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      seed: int or int tensor; restart r starts from the stateless seed (seed, r).

    Returns:
      The adversarial images (float32), same shape as `images`.
    """
    _check_budget(epsilon, steps=steps, restarts=restarts, clip_min=clip_min, clip_max=clip_max)
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}")
    return _call(
        _apgd_graph,
        model,
        images,
        labels,
        epsilon=epsilon,
        steps=steps,
        restarts=restarts,
        loss=loss,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )


@_graph_only
@_skip_empty
def _apgd_graph(model, images, labels, *, epsilon, steps, restarts, loss, clip_min, clip_max, seed):
    loss_fn = cross_entropy_loss if loss == "ce" else dlr_loss
    logits = model(images)
    if loss == "dlr":
        _num_classes(logits, 3, "apgd with loss='dlr'")
    fooled = _fooled(logits, labels)
    score = tf.fill(tf.shape(fooled), -float("inf"))
    run = functools.partial(
        _apgd_run,
        model,
        loss_fn=loss_fn,
        epsilon=epsilon,
        steps=steps,
        clip_min=clip_min,
        clip_max=clip_max,
    )

    def restart(r, adv, fooled, score):
        def attack(x, y, index):
            del index
            return run(x, y, seed=tf.stack([seed, tf.cast(r, tf.int64)]))

        return (r + 1, *_attack_robust(model, images, labels, adv, fooled, score, attack, loss_fn))

    # A loop in the graph, not in Python: one trace of the run for all restarts.
    _, adv, _, _ = tf.while_loop(
        lambda r, adv, fooled, score: (r < restarts) & ~tf.reduce_all(fooled),
        restart,
        (tf.constant(0), images, fooled, score),
    )
    return adv


@_graph_only
def apgd_t(
    model,
    images,
    labels,
    *,
    epsilon: float,
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed=0,
) -> tf.Tensor:
    """Targeted APGD on the targeted DLR loss (APGD-T of AutoAttack), L∞.

    For i = 1..n_target_classes, runs `restarts` APGD runs maximising
    `targeted_dlr_loss` with target t = the class of the (i+1)-th largest clean
    logit (the reference's `sort(logits)[1][:, -(i + 1)]`, autopgd_base.py
    L655-L668), each on the examples not fooled yet; an example is fooled when it
    is misclassified (as any class). Per example it keeps the worst case across
    targets: an image that fools, else the one with the highest untargeted DLR
    loss. Details and differences from the reference are those of `apgd`;
    run (i, r) starts from the stateless seed (seed, i·restarts + r).

    Args:
      model: callable mapping images to logits (>= 4 classes).
      images: float images [N, H, W, C] in [clip_min, clip_max].
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      steps: iterations per run (100 in AutoAttack).
      n_target_classes: how many of the most likely wrong classes to target
        (9 in AutoAttack); capped at the number of classes - 1.
      restarts: runs per target class.
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      seed: int or int tensor.

    Returns:
      The adversarial images (float32), same shape as `images`.
    """
    _check_budget(epsilon, steps=steps, restarts=restarts, clip_min=clip_min, clip_max=clip_max)
    if not (_is_int(n_target_classes) and n_target_classes >= 1):
        raise ValueError(f"n_target_classes must be an integer >= 1, got {n_target_classes!r}")
    return _call(
        _apgd_t_graph,
        model,
        images,
        labels,
        epsilon=epsilon,
        steps=steps,
        n_target_classes=n_target_classes,
        restarts=restarts,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )


@_graph_only
@_skip_empty
def _apgd_t_graph(
    model, images, labels, *, epsilon, steps, n_target_classes, restarts, clip_min, clip_max, seed
):
    logits = model(images)
    _num_classes(logits, 4, "apgd_t")
    # At most every wrong class (as fab_t; the reference fails past it).
    runs = tf.minimum(n_target_classes, tf.shape(logits)[-1] - 1) * restarts
    # Targets from the clean logits, largest first (stable on ties).
    order = tf.argsort(tf.cast(logits, tf.float32), axis=-1, direction="DESCENDING", stable=True)
    fooled = _fooled(logits, labels)
    score = tf.fill(tf.shape(fooled), -float("inf"))

    def run(j, adv, fooled, score):
        # Run j: target rank j // restarts + 1, restart j % restarts.
        target_rank = j // restarts + 1

        def attack(x, y, index):
            targets = tf.gather(order[:, target_rank], index)
            return _apgd_run(
                model,
                x,
                y,
                loss_fn=lambda y, z: targeted_dlr_loss(y, z, targets),
                epsilon=epsilon,
                steps=steps,
                clip_min=clip_min,
                clip_max=clip_max,
                seed=tf.stack([seed, tf.cast(j, tf.int64)]),
            )

        return (j + 1, *_attack_robust(model, images, labels, adv, fooled, score, attack, dlr_loss))

    # A loop in the graph, not in Python: one trace of the run for all targets.
    _, adv, _, _ = tf.while_loop(
        lambda j, adv, fooled, score: (j < runs) & ~tf.reduce_all(fooled),
        run,
        (tf.constant(0), images, fooled, score),
    )
    return adv


_COMPILED = {
    attack: tf.function(attack, reduce_retracing=True) for attack in (_apgd_graph, _apgd_t_graph)
}
