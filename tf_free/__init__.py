"""tf_free: free adversarial training (Shafahi et al., NeurIPS 2019) for Keras 3."""

import os

# TensorFlow's C++ INFO lines (CUDA probing, oneDNN) are noise for a user; warnings stay.
# Set before TensorFlow is first imported; an explicit TF_CPP_MIN_LOG_LEVEL wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from tf_free import attacks  # noqa: E402
from tf_free.fast import FastAdversarialModel  # noqa: E402
from tf_free.free import FreeAdversarialModel, PGDAdversarialModel  # noqa: E402

__all__ = ["FastAdversarialModel", "FreeAdversarialModel", "PGDAdversarialModel", "attacks"]
__version__ = "0.2.0"
