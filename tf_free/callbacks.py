"""Keras callbacks: robustness metrics and adversarial images to TensorBoard."""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_free import attacks, loop

EVAL_ATTACKS = ("pgd", "apgd-ce")


class RobustnessEvaluation(keras.callbacks.Callback):
    """Every `every` passes and after the last: clean and PGD-K (or APGD-CE) accuracy.

    Evaluates on `dataset` (a validation subset) at the end of a pass (Keras's
    `on_epoch_end`: a pass over the training data is Keras's epoch) when the
    number of passes done is a multiple of `every`, and after the last pass
    (`params["epochs"]`). Accuracies are fractions in [0, 1].

    Writes to `<log_dir>/robustness` (next to the `train`/`validation` runs of
    `keras.callbacks.TensorBoard`), with the number of passes done as step:
      - `robustness/clean_accuracy`, `robustness/pgd{K}_accuracy` (with
        `attack="apgd-ce"`: `robustness/apgd_ce{K}_accuracy`, K iterations of
        AutoAttack's APGD on the cross-entropy; `step_size` is then unused);
      - `robustness/wall_time_minutes` since training began (counting the
        time before a resume: `previous_seconds`), and
        `robustness/iterations` (optimizer steps; free training counts replays);
      - `adversarial_examples`: the first images, clean next to attacked.
    The accuracies are also added to the pass's `logs` (`val_clean_accuracy`,
    `val_pgd{K}_accuracy`), so History, CSVLogger and checkpoints see them, and
    kept in `last_results` ({"clean_accuracy", "pgd{K}_accuracy"}; None when
    the pass was not evaluated).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        log_dir: str,
        epsilon: float,
        step_size: float,
        steps: int,
        attack: str = "pgd",
        every: int = 1,
        num_images: int = 8,
        seed: int = 0,
        verbose: bool = True,
        previous_seconds: float = 0.0,
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if attack not in EVAL_ATTACKS:
            raise ValueError(f"attack must be one of {EVAL_ATTACKS}, got {attack!r}")
        self.attack = attack
        self.dataset = dataset
        self.epsilon, self.step_size, self.steps = epsilon, step_size, steps
        self.every = every
        self.num_images = num_images
        self.seed = seed
        self.verbose = verbose
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "robustness"))
        self._start = None
        self.previous_seconds = previous_seconds  # of training before a resume
        self.last_results = None  # of the last pass, if it was evaluated

    @property
    def pgd_name(self):
        """The attack's short name: pgd20, or apgd_ce100."""
        return f"{self.attack.replace('-', '_')}{self.steps}"

    @property
    def attack_label(self):
        return f"{'PGD' if self.attack == 'pgd' else 'APGD-CE'}-{self.steps}"

    def on_train_begin(self, logs=None):
        self._start = time.time() - self.previous_seconds

    def on_epoch_begin(self, epoch, logs=None):
        self.last_results = None

    def on_epoch_end(self, epoch, logs=None):
        # Keras's epoch is a pass; params["epochs"] is the number of passes.
        last_pass = epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every and not last_pass:
            return
        results = self.last_results = self.evaluate()
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in results.items()})
        minutes = (time.time() - self._start) / 60
        with self.writer.as_default(step=epoch + 1):
            for name, value in results.items():
                tf.summary.scalar(f"robustness/{name}", value)
            tf.summary.scalar("robustness/wall_time_minutes", minutes)
            tf.summary.scalar("robustness/iterations", loop.iterations(self.model))
            self._write_images()
        self.writer.flush()
        if self.verbose:
            print(
                f"\npass {epoch + 1}: clean {results['clean_accuracy']:.4f}, "
                f"{self.attack_label} {results[self.pgd_name + '_accuracy']:.4f} "
                f"(ε={self.epsilon:.4g}), {minutes:.1f} min"
            )

    def evaluate(self) -> dict[str, float]:
        model = self.model
        clean = attacks.accuracy_under_attack(model, self.dataset, verbose=False)
        attack, kwargs = self._attack()
        robust = attacks.accuracy_under_attack(model, self.dataset, attack, verbose=False, **kwargs)
        return {"clean_accuracy": clean, f"{self.pgd_name}_accuracy": robust}

    def _attack(self):
        if self.attack == "apgd-ce":
            return attacks.apgd, dict(epsilon=self.epsilon, steps=self.steps, seed=self.seed)
        return attacks.pgd, dict(
            epsilon=self.epsilon, step_size=self.step_size, steps=self.steps, seed=self.seed
        )

    def _write_images(self):
        images, labels = next(iter(self.dataset.unbatch().batch(self.num_images)))
        attack, kwargs = self._attack()
        adversarial = attack(self.model, images, labels, **kwargs)
        # One row per example: clean | adversarial | perturbation (rescaled).
        delta = (adversarial - images) / (2 * self.epsilon) + 0.5 if self.epsilon else images * 0
        grid = tf.concat([images, adversarial, tf.clip_by_value(delta, 0, 1)], axis=2)
        tf.summary.image(
            "adversarial_examples",
            grid,
            max_outputs=self.num_images,
            description=(
                f"clean | {self.attack_label} (ε={self.epsilon:.4g}) | perturbation "
                "(grey = 0). Predictions: "
                + ", ".join(
                    f"{int(y)}→{int(p)}"
                    for y, p in zip(labels.numpy(), np.argmax(self.model(adversarial), -1))
                )
            ),
        )
