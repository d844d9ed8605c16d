"""tf_free: free adversarial training (Shafahi et al., NeurIPS 2019) for Keras 3."""

from tf_free import attacks
from tf_free.free import FreeAdversarialModel, PGDAdversarialModel

__all__ = ["FreeAdversarialModel", "PGDAdversarialModel", "attacks"]
__version__ = "0.1.0"
