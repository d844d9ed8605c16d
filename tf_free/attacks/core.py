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


def _check_budget(epsilon, step_size=None, steps=None, restarts=None):
    # Python and numpy numbers are checked here; tensors are taken as given.
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


def _logits_loss_grad(model, images, labels, loss_fn):
    """One forward and one backward pass: logits, per-example loss, ∇ₓ loss."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = model(images)
        losses = loss_fn(labels, logits)
        total = tf.reduce_sum(losses)
    return logits, losses, tape.gradient(total, images)


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
) -> tf.Tensor:
    """L∞ projected gradient descent (Madry et al.), with restarts.

    Each restart starts at x (or, with `random_start`, at x plus uniform noise
    in [-ε, ε]) and takes `steps` signed-gradient steps of `step_size`, each
    projected back onto the ε-ball and the valid pixel range. Per example, it
    returns the iterate (over all steps and restarts) that fools the model, or
    if none does, the one with the highest loss. So adding steps or restarts
    never raises robust accuracy, and steps=1, step_size=ε without a random
    start is exactly `fgsm`. A large-ε BIM (the paper's Fig. 2) is this
    function with `random_start=False`.

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

    Returns:
      The adversarial images, same shape as `images`.
    """
    _check_budget(epsilon, step_size, steps, restarts)
    loss_fn = _loss_fn(loss)
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.convert_to_tensor(labels)
    seed = tf.cast(seed, tf.int64)

    def keep_best(best, adv, logits, losses, eligible=True):
        # Keeps `adv` per example where it beats the best so far.
        best_adv, best_fooled, best_losses = best
        fooled = _fooled(logits, labels)
        better = _is_better(fooled, losses, best_fooled, best_losses) & eligible
        return (
            _select(better, adv, best_adv),
            tf.where(better, fooled, best_fooled),
            tf.where(better, losses, best_losses),
        )

    n = tf.shape(images)[0]
    best = (images, tf.zeros([n], tf.bool), tf.fill([n], -float("inf")))
    for restart in range(int(restarts)):
        adv = images
        if random_start:
            noise = tf.random.stateless_uniform(
                tf.shape(images), seed=tf.stack([seed, restart]), minval=-epsilon, maxval=epsilon
            )
            adv = _project(images + noise, images, epsilon, clip_min, clip_max)

        def step(t, adv, best):
            logits, losses, grad = _logits_loss_grad(model, adv, labels, loss_fn)
            # Each iterate is judged by the pass that also gives its gradient;
            # the starting point is not a candidate, so PGD-1 is FGSM.
            best = keep_best(best, adv, logits, losses, eligible=t > 0)
            adv = _project(
                adv + step_size * gradient_sign(grad), images, epsilon, clip_min, clip_max
            )
            return t + 1, adv, best

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

    @tf.function(reduce_retracing=True)
    def correct_on_batch(images, labels):
        images = tf.cast(images, tf.float32)
        if attack is not None:
            images = attack(model, images, labels, **attack_kwargs)
        return tf.reduce_sum(tf.cast(~_fooled(model(images), labels), tf.int64))

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


def _batch_size(dataset: tf.data.Dataset) -> int:
    images_spec = dataset.element_spec[0]
    return images_spec.shape[0] or 256


def _cardinality(dataset: tf.data.Dataset):
    n = int(dataset.cardinality())
    return n if n >= 0 else None
