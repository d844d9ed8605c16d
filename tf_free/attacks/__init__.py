"""Attacks on image classifiers, all on one contract.

Every attack takes `model`: any callable mapping float images in
[clip_min, clip_max] to logits (a Keras model, or the `serve` endpoint of an
exported SavedModel), images [N, H, W, C], integer labels [N], and an L∞
budget in the units of the images. It returns adversarial images in the
ε-ball and the valid range.

- `core`: the losses, FGSM, PGD (CE/CW, restarts) and `accuracy_under_attack`.
  One PGD serves K-PGD training, evaluation and the figures.
- `fab`: `fab_t`, targeted L∞ FAB (minimal-norm boundary attack), as in AutoAttack.
- `square_attack`: `square`, the L∞ Square Attack (gradient-free random search).
- `adaptive_pgd`: `apgd` (APGD-CE/DLR) and `apgd_t` (APGD-T), the step-size-free
  PGD of AutoAttack, with the DLR losses and the checkpoint schedule.
- `ensemble`: `autoattack` (APGD-CE, APGD-T, FAB-T, Square; worst case per
  example) and the dataset drivers `autoattack_accuracy` and `attack_accuracy`.
"""

from tf_free.attacks.adaptive_pgd import (
    apgd,
    apgd_checkpoints,
    apgd_t,
    dlr_loss,
    targeted_dlr_loss,
)
from tf_free.attacks.core import (
    LOSSES,
    accuracy_under_attack,
    cross_entropy_loss,
    cw_loss,
    fgsm,
    gradient_sign,
    pgd,
)
from tf_free.attacks.ensemble import (
    attack_accuracy,
    autoattack,
    autoattack_accuracy,
    get_attack,
)
from tf_free.attacks.fab import fab_t
from tf_free.attacks.square_attack import square

__all__ = [
    "LOSSES",
    "accuracy_under_attack",
    "cross_entropy_loss",
    "cw_loss",
    "fgsm",
    "gradient_sign",
    "pgd",
    "fab_t",
    "square",
    "apgd",
    "apgd_checkpoints",
    "apgd_t",
    "dlr_loss",
    "targeted_dlr_loss",
    "attack_accuracy",
    "autoattack",
    "autoattack_accuracy",
    "get_attack",
]
