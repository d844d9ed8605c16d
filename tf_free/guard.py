"""The catastrophic-overfitting guard of "Fast is better than free" (Wong et al., ICLR 2020).

FGSM training can collapse within an epoch: PGD accuracy falls to about 0
while FGSM accuracy rises. locuslab/fast_adversarial `CIFAR10/train_fgsm.py`
L119-129 (`--early-stop`) checks, after every epoch, PGD-5 accuracy (step
2/255 at ε=8/255, one restart) on the epoch's first training batch, stops
when it fell by more than 0.2 since the previous check, and evaluates and
saves the weights of the last check before the drop.

`OverfitGuard` does the same for any method, as a Keras callback:

- the batch is fixed: the first batch of the first pass (`check_batch`);
- a check runs after every pass, or every `every` batches;
- the attack is `tf_free.attacks.pgd` with 5 steps of ε/4 (2/255 at ε=8/255)
  and one random start, with the model in inference mode (locuslab's model
  stays in training mode, so its checks also move the batch-norm averages;
  ours leave the model as it is);
- after a good check the model is saved (`<directory>/ckpt-*`: its weights,
  its optimizer, δ, and the guard's state); after a drop training stops and
  that model is restored, so the run is evaluated and exported from it;
- the state (the last accuracy, whether it fired, where) is checkpointed, so
  a killed and resumed run keeps it, and a run that stopped stays stopped.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from tf_free import attacks, loop


class OverfitGuard(loop.CallCallback):
    """Stops training at a catastrophic drop of PGD-5 accuracy; restores the weights before it.

    Args:
      check_batch: (images, labels), a fixed training batch.
      epsilon: the attack's L∞ radius (the training ε).
      directory: where the guard keeps the weights of its last good check and
        its state.
      drop: stop when the accuracy fell by more than this since the previous check.
      every: check every this many batches; 0: after every pass.
      log_dir: if given, `overfit_guard/pgd5_accuracy` goes to `<log_dir>/robustness`.
      seed: the attack's random start.

    After training, `fired` says whether it stopped the run, and `report` says
    where, in one line (also logged).
    """

    def __init__(
        self,
        check_batch,
        *,
        epsilon: float,
        directory: str,
        drop: float = 0.2,
        every: int = 0,
        log_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < drop <= 1:
            raise ValueError(f"drop must be in (0, 1], got {drop}")
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.images, self.labels = (tf.convert_to_tensor(t) for t in check_batch)
        self.epsilon, self.drop, self.every, self.seed = epsilon, drop, every, seed
        self.directory = directory
        self.writer = (
            tf.summary.create_file_writer(os.path.join(log_dir, "robustness")) if log_dir else None
        )
        # The guard's state, checkpointed with the weights of the last good check.
        self.last_accuracy = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        self.fired_at = tf.Variable(-1, dtype=tf.int64, trainable=False)  # iteration; -1: never
        self.restored_from = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self._manager = None
        self.report = None

    @property
    def fired(self) -> bool:
        return int(self.fired_at) >= 0

    def _checkpoint_manager(self):
        if self._manager is None:
            checkpoint = tf.train.Checkpoint(
                model=self.model,
                last_accuracy=self.last_accuracy,
                fired_at=self.fired_at,
                restored_from=self.restored_from,
            )
            self._manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=1)
        return self._manager

    def on_train_begin(self, logs=None):
        manager = self._checkpoint_manager()
        if manager.latest_checkpoint:  # a resumed run: the guard's state, not the weights
            state = tf.train.Checkpoint(
                last_accuracy=self.last_accuracy,
                fired_at=self.fired_at,
                restored_from=self.restored_from,
            )
            state.restore(manager.latest_checkpoint).expect_partial()
        if self.fired:
            self.report = self._line()
            logging.warning("%s; training does not go on", self.report)
            self.model.stop_training = True
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        before = self._batches
        self._batches += self._batches_in_call(batch)
        if self.every and loop.reached_multiple(before, self._batches, self.every):
            self._check()

    def on_epoch_end(self, epoch, logs=None):
        if not self.every and not self.fired:
            self._check()

    def accuracy(self) -> float:
        """PGD-5 accuracy on the check batch (5 steps of ε/4, one random start)."""
        adversarial = attacks.pgd(
            self.model,
            self.images,
            self.labels,
            epsilon=self.epsilon,
            step_size=self.epsilon / 4,
            steps=5,
            restarts=1,
            seed=self.seed,
        )
        predictions = tf.argmax(self.model(adversarial, training=False), -1)
        correct = tf.cast(predictions == tf.cast(self.labels, predictions.dtype), tf.float64)
        return float(tf.reduce_mean(correct))

    def _check(self):
        iteration = loop.iterations(self.model)
        accuracy = self.accuracy()
        if self.writer is not None:
            with self.writer.as_default(step=iteration):
                tf.summary.scalar(
                    "overfit_guard/pgd5_accuracy",
                    accuracy,
                    description=f"PGD-5 (ε={self.epsilon * 255:.4g}/255, step ε/4, one random "
                    f"start) accuracy on a fixed training batch of {len(self.labels)}: the "
                    f"catastrophic-overfitting guard stops at a drop above {self.drop:g}.",
                )
            self.writer.flush()
        previous = float(self.last_accuracy)
        manager = self._checkpoint_manager()
        if previous >= 0 and accuracy < previous - self.drop and manager.latest_checkpoint:
            restored = int(manager.latest_checkpoint.rsplit("-", 1)[1])
            self.fired_at.assign(iteration)
            self.restored_from.assign(restored)
            # The model of the last good check (with its optimizer: the run's state then).
            tf.train.Checkpoint(model=self.model).restore(
                manager.latest_checkpoint
            ).expect_partial()
            self.last_accuracy.assign(accuracy)
            manager.save(checkpoint_number=restored)  # the state, with those weights
            self.report = self._line(previous, accuracy)
            logging.warning("%s", self.report)
            self.model.stop_training = True
            return
        self.last_accuracy.assign(accuracy)
        manager.save(checkpoint_number=iteration)

    def _line(self, previous=None, accuracy=None) -> str:
        numbers = (
            f" (PGD-5 accuracy on the check batch {previous:.3f} -> {accuracy:.3f})"
            if previous is not None
            else ""
        )
        return (
            f"overfit guard: catastrophic overfitting at iteration {int(self.fired_at)}{numbers}; "
            f"training stopped and the weights of iteration {int(self.restored_from)} restored"
        )
