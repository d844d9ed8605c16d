"""The optimizer and the learning-rate schedules of the paper configurations.

Both official codes train with heavy-ball momentum SGD whose weight decay is
an L2 term of the loss, so the decay goes through the momentum:

- ashafahi/free_adv_train (the CIFAR tables), `free_train.py` L51:
  `total_loss = model.mean_xent + weight_decay * model.weight_decay_loss`,
  where `free_model.py` L151-157 (`_decay`) sums `tf.nn.l2_loss` (½‖W‖²) over
  the variables named `DW`: the conv and dense kernels, not the biases or the
  batch-norm γ/β; then `tf.train.MomentumOptimizer` (L48).
- mahyarnajibi/FreeAdversarialTraining (the ImageNet tables), `main_free.py`:
  `torch.optim.SGD(model.parameters(), lr, momentum, weight_decay=...)`,
  which adds wd·w to the gradient of every parameter before the momentum.

`keras.optimizers.SGD(weight_decay=...)` instead decays the weights directly,
outside the momentum (decoupled, as AdamW), which at momentum 0.9 is about
10× weaker at steady state; Keras's SGD also folds the learning rate into the
velocity, so an LR drop acts on the velocity only gradually. `MomentumSGD`
here is the update of both official codes, and the only one tf_free uses.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

DECAY_VARIABLES = ("kernels", "all")


class MomentumSGD(keras.optimizers.Optimizer):
    """SGD with heavy-ball momentum and coupled L2 weight decay, as torch and TF1 do it.

    For each variable w with gradient g (after the all-reduce over replicas):

        g ← g + weight_decay · w        (if w is one of `decay_variables`)
        v ← momentum · v + g
        w ← w − learning_rate · v

    This is `torch.optim.SGD(momentum=, weight_decay=)` (dampening 0, no
    Nesterov) and `tf.compat.v1.train.MomentumOptimizer` on a loss plus
    (weight_decay / 2)·Σ‖w‖².

    Args:
      learning_rate: a float or a `LearningRateSchedule` of `iterations`.
      momentum: in [0, 1).
      weight_decay: the L2 coefficient (the gradient of (wd/2)·‖w‖² is wd·w).
      decay_variables: "kernels": the conv and dense kernels only (variables
        named `kernel`, free_adv_train's `DW`); "all": every trainable variable
        (torch's `model.parameters()`), batch-norm γ/β and biases included.
      name: optimizer name.
      **kwargs: passed to `keras.optimizers.Optimizer`.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decay_variables: str = "kernels",
        name: str = "momentum_sgd",
        **kwargs,
    ):
        if kwargs.get("weight_decay") is not None:
            raise ValueError("MomentumSGD's weight decay is its own (coupled) argument")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not float(weight_decay) >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if decay_variables not in DECAY_VARIABLES:
            raise ValueError(
                f"decay_variables must be one of {DECAY_VARIABLES}, got {decay_variables!r}"
            )
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(weight_decay)
        self.decay_variables = decay_variables

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def decays(self, variable) -> bool:
        """Whether `variable` gets weight decay."""
        if self.coupled_weight_decay == 0.0:
            return False
        # Keras passes the backend variable here ("dense/kernel:0" under TensorFlow).
        short_name = variable.name.split("/")[-1].split(":")[0]
        return self.decay_variables == "all" or short_name == "kernel"

    def update_step(self, gradient, variable, learning_rate):
        gradient = ops.cast(gradient, variable.dtype)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        if self.decays(variable):
            gradient = gradient + ops.cast(self.coupled_weight_decay, variable.dtype) * variable
        velocity = self.velocities[self._get_variable_index(variable)]
        self.assign(velocity, ops.cast(self.momentum, variable.dtype) * velocity + gradient)
        self.assign_sub(variable, learning_rate * velocity)

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "weight_decay": self.coupled_weight_decay,
            "decay_variables": self.decay_variables,
        }


@keras.saving.register_keras_serializable(package="tf_free")
class CyclicLR(keras.optimizers.schedules.LearningRateSchedule):
    """Triangular one cycle: 0 → `peak` at half of training → 0.

    locuslab/fast_adversarial `CIFAR10/train_fgsm.py` L85-88 (and `train_free.py`,
    `train_pgd.py` L81-84): `torch.optim.lr_scheduler.CyclicLR(base_lr=0,
    max_lr=peak, step_size_up=lr_steps / 2, step_size_down=lr_steps / 2)`,
    stepped once per optimizer step, so the t-th update (t = 0, 1, ...) uses
    peak · t / (T/2) going up and peak · (T − t) / (T/2) coming down.
    """

    def __init__(self, peak, total_steps):
        self.peak = float(peak)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        half = max(1.0, 0.5 * self.total_steps)
        rate = tf.where(t < half, t / half, tf.maximum(0.0, (self.total_steps - t) / half))
        return self.peak * rate

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}
