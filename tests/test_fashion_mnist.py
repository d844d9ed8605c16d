"""A short real run on Fashion-MNIST: free training is robust, natural is not."""

import gzip
import os
import shutil

import keras
import numpy as np
import pytest

from tf_free import FreeAdversarialModel, attacks, data
from tf_free.models import small_cnn

# End-to-end: subprocesses and real training (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow

TRAIN_EXAMPLES, BATCH, NATURAL_EPOCHS, REPLAYS = 15_000, 128, 4, 4


def test_loader_reads_verified_idx_files():
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    # The test split has exactly 1,000 images of each of the 10 classes.
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


def test_loader_rejects_corrupt_or_missing_files(tmp_path):
    for name in os.listdir(data.FASHION_MNIST_DIR):
        shutil.copy(os.path.join(data.FASHION_MNIST_DIR, name), tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "rb") as f:
        payload = bytearray(f.read())
    payload[100] ^= 1  # one flipped bit in one label
    with gzip.open(labels, "wb") as f:
        f.write(payload)
    with pytest.raises(data.DataIntegrityError, match="MD5"):
        data.load_fashion_mnist("test", data_dir=str(tmp_path))
    labels.write_bytes(labels.read_bytes()[:-20])  # a truncated download
    with pytest.raises(data.DataIntegrityError, match="truncated|MD5"):
        data.load_fashion_mnist("test", data_dir=str(tmp_path))
    labels.unlink()
    with pytest.raises(data.DataIntegrityError, match="not found"):
        data.load_fashion_mnist("test", data_dir=str(tmp_path))
    data.load_fashion_mnist("train", data_dir=str(tmp_path))  # the others still load


def _train_and_attack(model, epochs, train, test):
    iterations = epochs * int(train.cardinality()) * getattr(model, "replays", 1)
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.05, iterations), momentum=0.9
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,  # XLA is slower on CPU (scripts/benchmark.py)
    )
    model.fit(train, epochs=epochs, verbose=0, shuffle=False)  # the dataset shuffles
    assert int(model.optimizer.iterations) == iterations
    clean = attacks.accuracy_under_attack(model, test, verbose=False)
    robust = attacks.accuracy_under_attack(
        model, test, attacks.pgd, epsilon=0.1, step_size=0.01, steps=20, verbose=False
    )
    return clean, robust


def test_free_training_is_robust_on_real_data():
    x, y = data.load_fashion_mnist("train")
    xt, yt = data.load_fashion_mnist("test")
    train = data.make_dataset(
        x[:TRAIN_EXAMPLES], y[:TRAIN_EXAMPLES], batch_size=BATCH, shuffle=True
    )
    test = data.make_dataset(xt[:1000], yt[:1000], batch_size=500, shuffle=False)

    keras.utils.set_random_seed(0)
    natural = _train_and_attack(small_cnn((28, 28, 1), 10), NATURAL_EPOCHS, train, test)
    keras.utils.set_random_seed(0)
    free_model = FreeAdversarialModel(small_cnn((28, 28, 1), 10), epsilon=0.1, replays=REPLAYS)
    # The same number of iterations: natural epochs / m passes over the data.
    free = _train_and_attack(free_model, NATURAL_EPOCHS // REPLAYS, train, test)

    print(f"natural clean/PGD-20 {natural}, free m={REPLAYS} {free}")
    assert natural[0] > 0.80 and free[0] > 0.70
    assert natural[1] < 0.25
    assert free[1] > natural[1] + 0.35
