"""White-box attacks on image classifiers: FGSM, PGD (CE or CW loss, restarts).

One PGD implementation serves K-PGD adversarial training (Alg. 1 of the
paper, `PGDAdversarialModel`), evaluation (`accuracy_under_attack`) and the
figures. Every function takes `model`: any callable mapping float images in
[clip_min, clip_max] to logits: a Keras model, or the `serve` endpoint of an
exported SavedModel. Images and ε share the same units (floats in [0, 1] by
default; the command line converts the paper's 0-255 values).
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable

import keras
import tensorflow as tf

LOSSES = ("ce", "cw")


def cross_entropy_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example softmax cross-entropy for integer labels."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
    )


def cw_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example Carlini-Wagner margin loss: max_{j != y} z_j - z_y.

    Positive exactly when the example is misclassified. This is the loss of
    the paper's CW-100 column (Madry et al.'s `cw` loss without the κ clip).
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    correct = tf.gather(logits, labels, axis=-1, batch_dims=1)
    # The true class is masked with -inf (not a large constant or a product
    # with a one-hot, which break on huge or infinite logits).
    is_true = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    wrong = tf.reduce_max(tf.where(is_true, -float("inf"), logits), axis=-1)
    return wrong - correct


def _loss_fn(loss: str) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    if loss == "ce":
        return cross_entropy_loss
    if loss == "cw":
        return cw_loss
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_budget(epsilon, step_size=None, steps=None, restarts=None, clip_min=None, clip_max=None):
    # Python and numpy numbers are checked here; tensors are taken as given.
    if isinstance(clip_min, numbers.Real) and isinstance(clip_max, numbers.Real):
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be < clip_max, got {clip_min} and {clip_max}")
    if isinstance(epsilon, numbers.Real) and not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if isinstance(step_size, numbers.Real) and not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if steps is not None and not (_is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if restarts is not None and not (_is_int(restarts) and restarts >= 1):
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")


def gradient_sign(grad: tf.Tensor) -> tf.Tensor:
    """sign(grad), with 0 where grad is not finite.

    Under mixed precision the input gradient is still multiplied by the loss
    scale (LossScaleOptimizer unscales weight gradients only); its sign is
    right, but on overflow sign(NaN) = NaN would poison the perturbation.
    """
    return tf.where(tf.math.is_finite(grad), tf.sign(grad), tf.zeros_like(grad))


# The upstream gradient (∂loss/∂logits) is rescaled per example so that its
# largest entry lies in [2**10, 2**11): small enough for float16 (max 65504) yet
# far above its smallest normal number (6e-5). A power of two is exact in binary
# floating point, so in float32 the input gradient is the unscaled one times 2**k,
# bit for bit: its sign, all that FGSM, PGD and APGD use, does not change.
_UPSTREAM_EXPONENT = 10
# Where the input gradient still overflows (a float16 model with a large
# Lipschitz constant), the scale is divided by 2**5 and the pass repeated, as a
# dynamic loss scale backs off; after 4 tries a non-finite gradient is left to
# `gradient_sign`, which zeroes it.
_BACKOFF_EXPONENT = 5
_MAX_BACKOFFS = 4


def _pow2(exponent: tf.Tensor) -> tf.Tensor:
    """2**exponent (float32, exact) for int32 exponents, clipped to the normal range."""
    exponent = tf.clip_by_value(exponent, -126, 127)
    return tf.bitcast(tf.bitwise.left_shift(exponent + 127, 23), tf.float32)


def _exponent(values: tf.Tensor) -> tf.Tensor:
    """floor(log2(values)) (int32) for positive normal float32 values, read from their bits."""
    bits = tf.bitcast(tf.cast(values, tf.float32), tf.int32)
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 23), 0xFF) - 127


def _batch_any(mask: tf.Tensor) -> tf.Tensor:
    """Per-example any() over all but the first axis."""
    return tf.reduce_any(tf.reshape(mask, [tf.shape(mask)[0], -1]), axis=-1)


@tf.autograph.experimental.do_not_convert
def _logits_loss_grad(model, images, labels, loss_fn):
    """One forward and one backward pass: logits, per-example loss, ∇ₓ loss (rescaled).

    The loss is computed in float32 from the logits and returned unscaled (APGD
    compares loss values). The input gradient is ∇ₓ loss_i times a positive power of
    two per example: its sign and direction are exact, its scale is not. Why: under
    `mixed_float16` the model's backward pass runs in float16, where an unscaled
    ∂loss/∂logits underflows to 0 once the logit margin exceeds ~17 (softmax tails
    below 6e-8), so the attack would never move and a fragile example would count as
    robust. Here ∂loss/∂logits is taken in float32, normalised per example to a
    largest entry in [2**10, 2**11), and fed to the model's backward pass (a loss
    scale that is never too small); where the input gradient overflows, the scale
    backs off and the pass is repeated for those examples.
    """
    labels = tf.convert_to_tensor(labels)

    def attempt(backoff):
        # backoff: int32 [N], how many times each example's scale was divided.
        with tf.GradientTape() as tape:
            tape.watch(images)
            logits = model(images)
        logits32 = tf.cast(logits, tf.float32)
        with tf.GradientTape() as inner:
            inner.watch(logits32)
            losses = loss_fn(labels, logits32)
            total = tf.reduce_sum(losses)
        upstream = inner.gradient(total, logits32)
        flat = tf.reshape(tf.abs(upstream), [tf.shape(upstream)[0], -1])
        largest = tf.reduce_max(flat, axis=-1)
        usable = tf.math.is_finite(largest) & (largest > 0)
        exponent = _UPSTREAM_EXPONENT - _exponent(tf.where(usable, largest, 1.0))
        exponent -= _BACKOFF_EXPONENT * backoff
        scale = tf.reshape(_pow2(exponent), [-1] + [1] * (len(upstream.shape) - 1))
        upstream = tf.cast(upstream * scale, logits.dtype)
        grad = tape.gradient(logits, images, output_gradients=upstream)
        if grad is None:  # the logits do not depend on the images
            grad = tf.zeros_like(images)
        return logits, losses, grad

    n = tf.shape(images)[0]
    logits, losses, grad = attempt(tf.zeros([n], tf.int32))

    def still_bad(backoff, grad):
        return _batch_any(~tf.math.is_finite(grad)) & (backoff < _MAX_BACKOFFS)

    def back_off(backoff, grad):
        bad = still_bad(backoff, grad)
        backoff = tf.where(bad, backoff + 1, backoff)
        _, _, retry = attempt(backoff)
        return backoff, _select(bad, retry, grad)

    # Rare (float16 models only): the loop body runs only when a gradient overflowed.
    _, grad = tf.while_loop(
        lambda backoff, grad: tf.reduce_any(still_bad(backoff, grad)),
        back_off,
        (tf.zeros([n], tf.int32), grad),
    )
    return logits, losses, grad


def _project(adv, images, epsilon, clip_min, clip_max):
    """Projects onto the L∞ ball of radius ε around `images`, then the box."""
    adv = tf.clip_by_value(adv, images - epsilon, images + epsilon)
    return tf.clip_by_value(adv, clip_min, clip_max)


def _is_better(fooled, losses, best_fooled, best_losses):
    """Prefers an image that fools the model, then the higher loss."""
    return (fooled & ~best_fooled) | ((fooled == best_fooled) & (losses > best_losses))


def _fooled(logits, labels):
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.not_equal(predictions, tf.cast(labels, tf.int32))


def _select(better, new, old):
    mask = tf.reshape(better, [-1] + [1] * (len(new.shape) - 1))
    return tf.where(mask, new, old)


def fgsm(
    model,
    images,
    labels,
    *,
    epsilon: float,
    loss: str = "ce",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
) -> tf.Tensor:
    """Fast gradient sign method (Goodfellow et al.): x + ε·sign(∇ₓ loss).

    Args:
      model: callable mapping images to logits.
      images: float images [N, H, W, C] in [clip_min, clip_max].
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      loss: "ce" (cross-entropy) or "cw" (Carlini-Wagner margin).
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.

    Returns:
      The adversarial images (float32), same shape as `images`.
    """
    _check_budget(epsilon)
    loss_fn = _loss_fn(loss)
    images = tf.convert_to_tensor(images, tf.float32)
    _, _, grad = _logits_loss_grad(model, images, labels, loss_fn)
    return _project(images + epsilon * gradient_sign(grad), images, epsilon, clip_min, clip_max)


def pgd(
    model,
    images,
    labels,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    loss: str = "ce",
    random_start: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed=0,
    early_stop: bool = True,
    select: str = "best",
) -> tf.Tensor:
    """L∞ projected gradient descent (Madry et al.), with restarts.

    Each restart starts at x (or, with `random_start`, at x plus uniform noise
    in [-ε, ε]) and takes `steps` signed-gradient steps of `step_size`, each
    projected back onto the ε-ball and the valid pixel range. Per example, it
    returns the iterate (over all steps and restarts) that fools the model, or
    if none does, the one with the highest loss. The clean image is a candidate
    too, for fooling only: an example the model already gets wrong stays fooled
    (returned as is, unless an iterate also fools it with a higher loss), as in
    AutoAttack, even if every iterate is classified right. So adding steps or
    restarts never raises robust accuracy, robust accuracy never exceeds clean
    accuracy, and steps=1, step_size=ε without a random start is exactly `fgsm`
    on every correctly classified example. A large-ε BIM (the paper's Fig. 2)
    is this function with `random_start=False`.

    Args:
      model: callable mapping images to logits.
      images: float images [N, H, W, C] in [clip_min, clip_max].
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      step_size: step per iteration, in the units of `images`.
      steps: iterations per restart (K in "PGD-K").
      restarts: independent starts; the strongest result is kept per example.
      loss: "ce" (cross-entropy) or "cw" (Carlini-Wagner margin).
      random_start: start from a uniformly random point of the ε-ball.
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      seed: int or int tensor; restart r draws its start from the stateless
        seed (seed, r), so results are reproducible and restarts differ.
      early_stop: stop once every example of the batch is fooled (accuracy
        cannot change after that); False takes every step, as for pictures of
        a full BIM (Fig. 2).
      select: "best" (evaluation): the strongest iterate per example, as
        above. "last" (K-PGD training): the K-th iterate, after exactly K
        forward and backward passes and no other model call, as the attack
        of Madry et al.'s training (`LinfPGDAttack.perturb` in
        MadryLab/cifar10_challenge `pgd_attack.py` L43-61, the baseline of the
        paper's Table 1); one restart, every step.

    Returns:
      The adversarial images, same shape as `images`.
    """
    _check_budget(epsilon, step_size, steps, restarts, clip_min=clip_min, clip_max=clip_max)
    loss_fn = _loss_fn(loss)
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.convert_to_tensor(labels)
    seed = tf.cast(seed, tf.int64)

    def start(restart):
        if not random_start:
            return images
        noise = tf.random.stateless_uniform(
            tf.shape(images), seed=tf.stack([seed, restart]), minval=-epsilon, maxval=epsilon
        )
        return _project(images + noise, images, epsilon, clip_min, clip_max)

    def ascend(adv, grad):
        return _project(adv + step_size * gradient_sign(grad), images, epsilon, clip_min, clip_max)

    if select == "last":
        if restarts != 1:
            raise ValueError(f"select='last' takes one restart, got {restarts}")

        def plain_step(t, adv):
            _, _, grad = _logits_loss_grad(model, adv, labels, loss_fn)
            return t + 1, ascend(adv, grad)

        _, adv = tf.while_loop(lambda t, adv: t < steps, plain_step, (tf.constant(0), start(0)))
        return adv
    if select != "best":
        raise ValueError(f"select must be 'best' or 'last', got {select!r}")

    def keep_best(best, adv, logits, losses, eligible=True, fooling_only=False):
        # Keeps `adv` per example where it beats the best so far; with
        # `fooling_only`, only where it fools.
        best_adv, best_fooled, best_losses = best
        fooled = _fooled(logits, labels)
        better = _is_better(fooled, losses, best_fooled, best_losses) & eligible
        better = better & (fooled | tf.logical_not(fooling_only))
        return (
            _select(better, adv, best_adv),
            tf.where(better, fooled, best_fooled),
            tf.where(better, losses, best_losses),
        )

    n = tf.shape(images)[0]
    best = (images, tf.zeros([n], tf.bool), tf.fill([n], -float("inf")))
    if random_start:
        # One more forward pass, on the clean images (without a random start,
        # step 0 of every restart evaluates them anyway).
        logits = model(images)
        best = keep_best(best, images, logits, loss_fn(labels, logits), fooling_only=True)
    for restart in range(int(restarts)):
        adv = start(restart)

        def step(t, adv, best):
            logits, losses, grad = _logits_loss_grad(model, adv, labels, loss_fn)
            # Each iterate is judged by the pass that also gives its gradient.
            # The starting point is no candidate (so PGD-1 is FGSM), except a
            # clean image (no random start) for fooling.
            if random_start:
                best = keep_best(best, adv, logits, losses, eligible=t > 0)
            else:
                best = keep_best(best, adv, logits, losses, fooling_only=t == 0)
            return t + 1, ascend(adv, grad), best

        # tf.while_loop, not a Python loop: steps may be 100, and Keras runs
        # train_step unconverted by AutoGraph.
        def keep_going(t, adv, best):
            # With early_stop, stops once every example is fooled: more steps
            # cannot undo that.
            going = t < steps
            if early_stop:
                going = going & ~tf.reduce_all(best[1])
            return going

        _, adv, best = tf.while_loop(
            keep_going,
            step,
            (tf.constant(0), adv, best),
        )
        logits = model(adv)
        best = keep_best(best, adv, logits, loss_fn(labels, logits))
    return best[0]


def accuracy_under_attack(
    model,
    dataset: tf.data.Dataset,
    attack: Callable | None = None,
    *,
    num_examples: int | None = None,
    verbose: bool = True,
    **attack_kwargs,
) -> float:
    """Top-1 accuracy of `model` on `attack(model, images, labels)` over a dataset.

    Args:
      model: callable mapping images to logits.
      dataset: batches of (images, labels), images as floats in [0, 1].
      attack: `fgsm`, `pgd` or any function with their signature; None means
        clean (natural) accuracy.
      num_examples: stop after this many examples (None: the whole dataset).
      verbose: show a progress bar.
      **attack_kwargs: passed to `attack` (epsilon, step_size, steps, ...).

    Returns:
      Accuracy in [0, 1].
    """
    correct_on_batch = _correct_on_batch(model, attack, attack_kwargs)
    if num_examples is not None:
        dataset = dataset.unbatch().take(num_examples).batch(_batch_size(dataset))
    total = correct = 0
    progress = keras.utils.Progbar(num_examples or _cardinality(dataset), verbose=int(verbose))
    for images, labels in dataset:
        correct += int(correct_on_batch(images, labels))
        total += int(tf.shape(labels)[0])
        progress.add(int(tf.shape(labels)[0]) if num_examples else 1)
    if total == 0:
        raise ValueError("accuracy_under_attack got an empty dataset")
    return correct / total


# model -> {(attack, its arguments): the compiled step}: an evaluation repeated
# during training (tf_free.callbacks) traces its attack once, not every time.
_COMPILED = weakref.WeakKeyDictionary()


def _correct_on_batch(model, attack, attack_kwargs):
    """A tf.function counting the examples of a batch that `attack` does not fool."""

    @tf.function(reduce_retracing=True)
    def correct_on_batch(images, labels):
        images = tf.cast(images, tf.float32)
        if attack is not None:
            images = attack(model, images, labels, **attack_kwargs)
        return tf.reduce_sum(tf.cast(~_fooled(model(images), labels), tf.int64))

    try:
        key = (attack, tuple(sorted(attack_kwargs.items())))
        hash(key)
        cache = _COMPILED.setdefault(model, {})
    except TypeError:  # unhashable arguments, or a model that takes no weak reference
        return correct_on_batch
    return cache.setdefault(key, correct_on_batch)


def _batch_size(dataset: tf.data.Dataset) -> int:
    images_spec = dataset.element_spec[0]
    return images_spec.shape[0] or 256


def _cardinality(dataset: tf.data.Dataset):
    n = int(dataset.cardinality())
    return n if n >= 0 else None
