"""Input data: TFDS datasets as batched (images, labels), images float32 in [0, 1].

One module per concern, their public names re-exported here (`data.X`):
`catalogue` describes the datasets (`DatasetSpec`, `dataset_info`), checks
that their data can be had (`check_available`), defines the errors and has
TFDS prepare them (failing fast offline, leaving nothing behind on failure);
`preprocessing` converts and augments single images (CIFAR crop and flip,
ImageNet random-resized crop, resize + centre crop); `fashion_mnist` prepares
Fashion-MNIST offline from Debian's `dataset-fashion-mnist` files, MD5-checked
(`prepare_fashion_mnist`, `load_fashion_mnist`); `pipeline` builds the seeded
tf.data pipelines (`build_dataset`, `make_dataset`).
"""

from tf_free.data.catalogue import (
    CONNECT_TIMEOUT,
    DOWNLOAD_RETRIES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FIRST_CLASS_DATASETS,
    IMAGENET_MANUAL_FILES,
    DataError,
    DataIntegrityError,
    DataNotFoundError,
    DatasetSpec,
    check_available,
    class_names,
    dataset_info,
    imagenet_manual_dir,
    split_size,
)
from tf_free.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    prepare_fashion_mnist,
)
from tf_free.data.pipeline import (
    IMAGENET_SHUFFLE_BUFFER,
    build_dataset,
    make_dataset,
    to_float_images,
)
from tf_free.data.preprocessing import (
    cifar_train_preprocess,
    imagenet_eval_preprocess,
    imagenet_train_preprocess,
    pad_and_random_crop,
    random_flip,
    random_resized_crop_window,
    resize_shorter_and_center_crop,
    to_float,
)

__all__ = [
    # catalogue
    "CONNECT_TIMEOUT",
    "DOWNLOAD_RETRIES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FIRST_CLASS_DATASETS",
    "IMAGENET_MANUAL_FILES",
    "DataError",
    "DataIntegrityError",
    "DataNotFoundError",
    "DatasetSpec",
    "check_available",
    "class_names",
    "dataset_info",
    "split_size",
    "imagenet_manual_dir",
    # fashion_mnist
    "FASHION_MNIST_CLASSES",
    "load_fashion_mnist",
    "prepare_fashion_mnist",
    # pipeline
    "IMAGENET_SHUFFLE_BUFFER",
    "build_dataset",
    "make_dataset",
    "to_float_images",
    # preprocessing
    "cifar_train_preprocess",
    "imagenet_eval_preprocess",
    "imagenet_train_preprocess",
    "pad_and_random_crop",
    "random_flip",
    "random_resized_crop_window",
    "resize_shorter_and_center_crop",
    "to_float",
]
