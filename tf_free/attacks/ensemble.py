"""AutoAttack (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, L∞.

The ensemble of `autoattack/autoattack.py` in fra31/auto-attack:
`run_standard_evaluation` (L81-L260) runs the attacks in turn, each only on the
examples no earlier attack fooled (and never on the misclassified clean ones),
and keeps the first adversarial image found per example; `set_version`
(L302-L320) gives the standard settings: APGD-CE with 1 restart, APGD-T and
FAB-T with 9 target classes and 1 restart, Square with 5000 queries
(p_init = 0.8, `resc_schedule=False`, L42-L43), 100 iterations everywhere.
"fast" stops after the two APGD attacks (not a version of the reference).

`autoattack` attacks one batch of tensors (usable inside a `tf.function`);
`autoattack_accuracy` evaluates a dataset, attack by attack, with timings;
`attack_accuracy` runs one attack of the ensemble alone over a dataset, and
`get_attack` gives it as a function with the signature of `tf_free.attacks.pgd`
(e.g. for `accuracy_under_attack`).
"""

from __future__ import annotations

import functools
import time

import keras
import numpy as np
import tensorflow as tf

from tf_free.attacks.adaptive_pgd import apgd, apgd_t
from tf_free.attacks.core import _check_budget, _fooled
from tf_free.attacks.fab import fab_t
from tf_free.attacks.square_attack import square

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = {"standard": ATTACKS, "fast": ("apgd-ce", "apgd-t")}
# autoattack.py L306-L320 (standard version, L∞).
STEPS = 100
N_TARGET_CLASSES = 9
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8


# Each attack with AutoAttack's standard settings: (model, images, labels, *,
# epsilon, clip_min=0., clip_max=1., seed=0) -> adversarial images.
_ATTACK_FNS = {
    "apgd-ce": functools.partial(apgd, steps=STEPS, restarts=1, loss="ce"),
    # n_target_classes is capped at the number of classes - 1 (apgd_t, fab_t).
    "apgd-t": functools.partial(apgd_t, steps=STEPS, n_target_classes=N_TARGET_CLASSES, restarts=1),
    "fab-t": functools.partial(fab_t, steps=STEPS, n_target_classes=N_TARGET_CLASSES, restarts=1),
    # AutoAttack builds its Square with resc_schedule=False (autoattack.py L43).
    "square": functools.partial(
        square, queries=SQUARE_QUERIES, p_init=SQUARE_P_INIT, restarts=1, rescale_schedule=False
    ),
}


def get_attack(name: str):
    """One attack of the ensemble, with AutoAttack's standard settings.

    Args:
      name: "apgd-ce", "apgd-t", "fab-t" or "square".

    Returns:
      A function `(model, images, labels, *, epsilon, clip_min=0., clip_max=1.,
      seed=0) -> adversarial images`, e.g. for `accuracy_under_attack`.
    """
    if name not in _ATTACK_FNS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {name!r}")
    return _ATTACK_FNS[name]


def _attack_names(version: str, attacks) -> tuple[str, ...]:
    if attacks is None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {tuple(VERSIONS)}, got {version!r}")
        return VERSIONS[version]
    if isinstance(attacks, str):
        attacks = (attacks,)
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError("attacks must name at least one attack")
    for name in attacks:
        get_attack(name)
    return attacks


def autoattack(
    model,
    images,
    labels,
    *,
    epsilon: float,
    version: str = "standard",
    attacks=None,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed=0,
) -> tf.Tensor:
    """AutoAttack on one batch: the worst case per example over its attacks.

    The attacks run in order, each on the examples that the clean image and
    every earlier attack left correctly classified (autoattack.py L155-L228);
    an example keeps the first image that fools the model, so the result fools
    every example that any attack fooled on its own turn. Examples that no
    attack fools get the first attack's image (APGD-CE's highest-loss point),
    not the clean one as in the reference; misclassified clean images are
    returned as they are.

    Args:
      model: callable mapping images to logits.
      images: float images [N, H, W, C] in [clip_min, clip_max].
      labels: integer labels [N].
      epsilon: L∞ budget, in the units of `images`.
      version: "standard" (APGD-CE, APGD-T, FAB-T, Square) or "fast"
        (APGD-CE, APGD-T).
      attacks: names from `ATTACKS` to run instead of `version`, in order.
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      seed: int or int tensor, passed to every attack (as the reference does).

    Returns:
      The adversarial images (float32), same shape as `images`.
    """
    _check_budget(epsilon)
    names = _attack_names(version, attacks)
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    attack_fns = [get_attack(name) for name in names]
    kwargs = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max, seed=seed)

    def run(attack, adv, fooled, keep_all):
        index = tf.where(~fooled)[:, 0]
        y = tf.gather(labels, index)
        new = attack(model, tf.gather(images, index), y, **kwargs)
        new_fooled = _fooled(model(new), y)
        keep = tf.ones_like(new_fooled) if keep_all else new_fooled
        adv = tf.tensor_scatter_nd_update(
            adv, tf.boolean_mask(index, keep)[:, None], tf.boolean_mask(new, keep)
        )
        return adv, tf.tensor_scatter_nd_update(fooled, index[:, None], new_fooled)

    def ensemble():
        fooled = _fooled(model(images), labels)
        adv = images
        for i, attack in enumerate(attack_fns):
            # Only while some example is robust: a SavedModel's convolutions
            # fail on an empty batch.
            adv, fooled = tf.cond(
                tf.reduce_any(~fooled),
                lambda attack=attack, i=i, adv=adv, fooled=fooled: run(attack, adv, fooled, i == 0),
                lambda adv=adv, fooled=fooled: (adv, fooled),
            )
        return adv

    return tf.cond(tf.shape(images)[0] > 0, ensemble, lambda: images)


def _take(dataset: tf.data.Dataset, num_examples: int | None):
    """The first `num_examples` (images, labels) of a batched dataset, as numpy, and the
    size of its first batch."""
    images, labels, total = [], [], 0
    for x, y in dataset:
        images.append(np.asarray(x, np.float32))
        labels.append(np.asarray(y).astype(np.int32))
        total += len(labels[-1])
        if num_examples is not None and total >= num_examples:
            break
    if not images:
        raise ValueError("autoattack_accuracy got an empty dataset")
    first = len(labels[0])
    images, labels = np.concatenate(images), np.concatenate(labels)
    if num_examples is not None:
        images, labels = images[:num_examples], labels[:num_examples]
    return images, labels, first


def autoattack_accuracy(
    model,
    dataset: tf.data.Dataset,
    *,
    epsilon: float,
    version: str = "standard",
    attacks=None,
    num_examples: int | None = None,
    batch_size: int | None = None,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    verbose: bool = True,
    seed=0,
) -> dict:
    """Clean and AutoAttack robust accuracy over a dataset, attack by attack.

    As `run_standard_evaluation` (autoattack.py L81-L260): each attack runs on
    every example still robust, packed into batches of `batch_size`, before the
    next attack starts; the accuracy after an attack is the cumulative worst
    case. Each attack is one `tf.function` (traced once; its seconds include
    the tracing). With `verbose`, a Keras progress bar per attack and one line
    per attack (robust accuracy after it, seconds).

    Args:
      model: callable mapping images to logits.
      dataset: batches of (images, labels), images as floats in [clip_min, clip_max].
      epsilon: L∞ budget, in the units of the images.
      version: "standard" or "fast" (see `autoattack`).
      attacks: names from `ATTACKS` to run instead of `version`, in order; one
        name gives that attack alone.
      num_examples: use the first examples only (None: the whole dataset).
      batch_size: examples per attack call (None: the dataset's first batch size).
      clip_min: smallest valid pixel value.
      clip_max: largest valid pixel value.
      verbose: show progress and print one line per attack.
      seed: passed to every attack.

    Returns:
      {"num_examples": n, "clean": clean accuracy, "robust": {attack: robust
      accuracy after it}, "seconds": {attack: seconds}, "final": robust accuracy
      after all attacks}; accuracies are fractions in [0, 1].
    """
    _check_budget(epsilon)
    names = _attack_names(version, attacks)
    if num_examples is not None and not (isinstance(num_examples, int) and num_examples >= 1):
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    images, labels, first_batch = _take(dataset, num_examples)
    n = len(labels)
    batch_size = batch_size or first_batch
    spec = (
        tf.TensorSpec([None, *images.shape[1:]], tf.float32),
        tf.TensorSpec([None], tf.int32),
    )

    def batches(index):
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            yield chunk, images[chunk], labels[chunk]

    predict = tf.function(lambda x, y: _fooled(model(x), y), input_signature=spec)
    fooled = np.zeros(n, bool)
    for chunk, x, y in batches(np.arange(n)):
        fooled[chunk] = predict(x, y).numpy()
    result = {
        "num_examples": n,
        "clean": float(1 - fooled.mean()),
        "robust": {},
        "seconds": {},
    }
    if verbose:
        print(f"clean accuracy: {result['clean']:.2%} ({n} examples)")
    for name in names:
        attack = get_attack(name)

        def fooled_by_attack(x, y, attack=attack):
            adv = attack(
                model, x, y, epsilon=epsilon, clip_min=clip_min, clip_max=clip_max, seed=seed
            )
            return _fooled(model(adv), y)

        run = tf.function(fooled_by_attack, input_signature=spec)
        index = np.flatnonzero(~fooled)
        progress = keras.utils.Progbar(len(index), verbose=int(verbose and len(index) > 0))
        start = time.perf_counter()
        for chunk, x, y in batches(index):
            fooled[chunk] = run(x, y).numpy()
            progress.add(len(chunk))
        seconds = time.perf_counter() - start
        result["robust"][name] = float(1 - fooled.mean())
        result["seconds"][name] = seconds
        if verbose:
            print(
                f"robust accuracy after {name.upper()}: {result['robust'][name]:.2%} "
                f"({seconds:.1f} s)"
            )
    result["final"] = float(1 - fooled.mean())
    return result


def attack_accuracy(
    model, dataset: tf.data.Dataset, name: str, *, epsilon: float, **kwargs
) -> dict:
    """One attack of the ensemble alone over a dataset (a column per attack).

    `autoattack_accuracy` with `attacks=(name,)`: the same dict, whose "final"
    is this attack's robust accuracy.

    Args:
      model: callable mapping images to logits.
      dataset: batches of (images, labels).
      name: "apgd-ce", "apgd-t", "fab-t" or "square".
      epsilon: L∞ budget, in the units of the images.
      **kwargs: num_examples, batch_size, clip_min, clip_max, verbose, seed.

    Returns:
      The dict of `autoattack_accuracy`.
    """
    get_attack(name)
    return autoattack_accuracy(model, dataset, epsilon=epsilon, attacks=(name,), **kwargs)
