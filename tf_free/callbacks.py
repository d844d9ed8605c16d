"""Keras callbacks: robustness metrics and adversarial images to TensorBoard."""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_free import attacks, evaluation, loop

EVAL_ATTACKS = ("pgd", "apgd-ce")


class RobustnessEvaluation(keras.callbacks.Callback):
    """Clean and PGD-K (or APGD-CE) accuracy during training, to `<log_dir>/robustness`.

    Evaluates on `dataset` (the first examples of the evaluation split; without
    tf.data's autotuning unless its options set it, `evaluation.without_autotune`):
    every `every` passes (Keras's `on_epoch_end`: a pass over the training
    data is Keras's epoch), or with `every_iterations` every that many
    optimizer iterations (in `on_train_batch_end`, at the batch that reaches a
    multiple); and always after the last pass (`params["epochs"]`).
    Accuracies are fractions in [0, 1]. With the optimizer's iteration count
    as step (replays count, as in `tf_free.summaries`):
      - `robustness/clean_accuracy`, `robustness/pgd{K}_accuracy` (with
        `attack="apgd-ce"`: `robustness/apgd_ce{K}_accuracy`, K iterations of
        AutoAttack's APGD on the cross-entropy; `step_size` is then unused),
        each described with its attack and number of examples;
      - `time/eval_minutes`: the time spent in these evaluations so far (kept
        across a resume in `params["train_state"]`, when `tf_free.loop.fit`
        gives it);
      - `x_adv/<attack>, ε=<ε>/255`: the first images, clean | attacked |
        perturbation, with class names (`class_names`) in the description.
    The accuracies of a pass's last evaluation are also added to its `logs`
    (`val_clean_accuracy`, `val_pgd{K}_accuracy`), so History, CSVLogger and
    checkpoints see them, and kept in `last_results` ({"clean_accuracy",
    "pgd{K}_accuracy"}; None when the pass was not evaluated).
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
        every_iterations: int = 0,
        num_images: int = 8,
        seed: int = 0,
        verbose: bool = True,
        class_names: list[str] | None = None,
        num_examples: int | None = None,
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if every_iterations < 0:
            raise ValueError(f"every_iterations must be >= 0, got {every_iterations}")
        if attack not in EVAL_ATTACKS:
            raise ValueError(f"attack must be one of {EVAL_ATTACKS}, got {attack!r}")
        self.attack = attack
        # tf.data autotuning's lost wake-up would hold up each evaluation's end (Model::OptimizeLoop in https://github.com/tensorflow/tensorflow/blob/v2.21.0/tensorflow/core/framework/model.cc).
        self.dataset = evaluation.without_autotune(dataset)
        self.epsilon, self.step_size, self.steps = epsilon, step_size, steps
        self.every = every
        self.every_iterations = every_iterations
        self.num_images = num_images
        self.seed = seed
        self.verbose = verbose
        self.class_names = class_names
        self.num_examples = num_examples
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "robustness"))
        self.eval_seconds = 0.0  # without a train_state to keep them in
        self.last_results = None  # of the last pass, if it was evaluated
        self._evaluated_at = None  # the iteration of the last evaluation

    @property
    def pgd_name(self):
        """The attack's short name: pgd20, or apgd_ce100."""
        return f"{self.attack.replace('-', '_')}{self.steps}"

    @property
    def attack_label(self):
        return f"{'PGD' if self.attack == 'pgd' else 'APGD-CE'}-{self.steps}"

    def on_train_begin(self, logs=None):
        self._last_iteration = loop.iterations(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self.last_results = None

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_iterations:
            return
        iteration = loop.iterations(self.model)
        reached = loop.reached_multiple(self._last_iteration, iteration, self.every_iterations)
        self._last_iteration = iteration
        if reached:
            self._evaluate_and_write(iteration, f"iteration {iteration}")

    def on_epoch_end(self, epoch, logs=None):
        # Keras's epoch is a pass; params["epochs"] is the number of passes.
        last_pass = epoch + 1 == self.params.get("epochs")
        due = not self.every_iterations and (epoch + 1) % self.every == 0
        if not (due or last_pass):
            return
        iteration = loop.iterations(self.model)
        if iteration != self._evaluated_at or self.last_results is None:
            self._evaluate_and_write(iteration, f"pass {epoch + 1}")
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in self.last_results.items()})

    def _evaluate_and_write(self, iteration: int, where: str) -> None:
        began = time.time()
        results = self.last_results = self.evaluate()
        examples = (
            f"the first {self.num_examples} test examples"
            if self.num_examples
            else "the test examples"
        )
        with self.writer.as_default(step=iteration):
            tf.summary.scalar(
                "robustness/clean_accuracy",
                results["clean_accuracy"],
                description=f"Clean accuracy on {examples}.",
            )
            tf.summary.scalar(
                f"robustness/{self.pgd_name}_accuracy",
                results[f"{self.pgd_name}_accuracy"],
                description=f"Accuracy under {self._attack_description()} on {examples}.",
            )
            self._write_images()
            seconds = self._add_eval_seconds(time.time() - began)
            tf.summary.scalar(
                "time/eval_minutes",
                seconds / 60,
                description="Time spent in these evaluations so far (not in time/train_minutes).",
            )
        self.writer.flush()
        self._evaluated_at = iteration
        if self.verbose:
            print(
                f"\n{where}: clean {results['clean_accuracy']:.4f}, "
                f"{self.attack_label} {results[self.pgd_name + '_accuracy']:.4f} "
                f"(ε={self.epsilon:.4g}), {seconds / 60:.1f} min of evaluation so far"
            )

    def _add_eval_seconds(self, seconds: float) -> float:
        state = self.params.get("train_state") if self.params else None
        if state is None:
            self.eval_seconds += seconds
            return self.eval_seconds
        state.eval_seconds.assign_add(seconds)
        return float(state.eval_seconds)

    def _attack_description(self) -> str:
        epsilon = f"ε={self.epsilon * 255:.4g}/255"
        if self.attack == "apgd-ce":
            return f"APGD-CE with {self.steps} iterations ({epsilon}, AutoAttack's step-size rule)"
        return (
            f"PGD-{self.steps} ({epsilon}, step {self.step_size * 255:.4g}/255, one random start)"
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

    def _name(self, label) -> str:
        label = int(label)
        if self.class_names and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def _write_images(self):
        images, labels = next(iter(self.dataset.unbatch().batch(self.num_images)))
        attack, kwargs = self._attack()
        adversarial = attack(self.model, images, labels, **kwargs)
        predictions = np.argmax(self.model(adversarial), -1)
        # One row per example: clean | adversarial | perturbation (rescaled).
        delta = (adversarial - images) / (2 * self.epsilon) + 0.5 if self.epsilon else images * 0
        grid = tf.concat([images, adversarial, tf.clip_by_value(delta, 0, 1)], axis=2)
        tf.summary.image(
            f"x_adv/{self.attack_label}, ε={self.epsilon * 255:.4g}/255",
            grid,
            max_outputs=self.num_images,
            description=(
                f"Each row: clean | {self._attack_description()} | perturbation (grey = 0, "
                "white/black = ±ε). True class → class predicted on the attacked image, by row: "
                + "; ".join(
                    f"{i + 1}. {self._name(y)} → {self._name(p)}"
                    for i, (y, p) in enumerate(zip(labels.numpy(), predictions))
                )
            ),
        )
