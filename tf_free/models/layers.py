"""Pieces shared by the models."""

import keras
import numpy as np


def normalize(inputs, mean=None, std=None):
    """Per-channel (x - mean) / std inside the model; identity when both are None."""
    if mean is None and std is None:
        return inputs
    channels = inputs.shape[-1]
    mean = np.broadcast_to(np.asarray(0.0 if mean is None else mean, "float32"), (channels,))
    std = np.broadcast_to(np.asarray(1.0 if std is None else std, "float32"), (channels,))
    return keras.layers.Normalization(mean=mean, variance=np.square(std), name="normalize")(inputs)
