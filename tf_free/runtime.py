"""Where a run executes: devices, the tf.distribute strategy, XLA, seeds and precision.

Everything here must happen before TensorFlow runs its first op
(`configure_cpu_devices`, `build_strategy`) or before the model is built
(`set_up`).
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf
from absl import logging

from tf_free.config import PRECISIONS, ConfigError, TrainConfig


def configure_cpu_devices(cpu_devices: int) -> None:
    """Without GPUs, splits the CPU into `cpu_devices` logical devices.

    A stand-in for a multi-GPU machine: `--strategy=mirrored` then runs one
    replica per logical CPU. It must run before TensorFlow initialises.
    """
    if cpu_devices <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) < cpu_devices:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices
        )


def build_strategy(name: str, cpu_devices: int = 1) -> tf.distribute.Strategy:
    """The tf.distribute strategy; create it before any other TensorFlow op runs.

    auto: mirrored when more than one GPU is visible, else default. mirrored:
    all GPUs, or without GPUs the first `cpu_devices` logical CPUs.
    multi_worker: MultiWorkerMirroredStrategy, cluster from TF_CONFIG (see
    scripts/launch_local_workers.sh). tpu: TPUStrategy on the TPU the
    environment names (untested here: no TPU).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "mirrored":
        devices = None
        if not gpus:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_devices]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError(
                "--strategy=multi_worker needs TF_CONFIG (the cluster and this worker's "
                "index); scripts/launch_local_workers.sh sets it for workers on this machine"
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as e:
            raise ConfigError(f"TF_CONFIG is not valid JSON: {e}") from e
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise ConfigError(f"--strategy=tpu: no TPU found ({e})") from e
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def drops_remainder(strategy_name: str) -> bool:
    """Whether the last partial batch of a pass is dropped.

    Across workers (and on TPUs) every step needs a full batch on every
    replica; MirroredStrategy takes a short batch (free.py).
    """
    return strategy_name in ("multi_worker", "tpu")


def resolve_jit(setting: str, strategy: tf.distribute.Strategy, method: str = "free"):
    """How to XLA-compile training: False, True (Keras, the whole step) or "per_replica".

    auto: on for GPUs/TPUs, off on CPU-only machines, where XLA made these
    models slower here (measure with scripts/benchmark.py --jit_compile), as
    Keras's own "auto" does. With several replicas Keras cannot compile the
    step, which holds the all-reduce (keras-team/keras#18716, #19005); free and
    PGD training then compile each replica's forward/backward ("per_replica")
    and leave the all-reduce outside. Natural training (a plain Keras model)
    goes on without XLA, with a log line.
    """
    if setting == "false":
        return False
    if setting == "auto":
        accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices(
            "TPU"
        )
        if not accelerators:
            return False
    if strategy.num_replicas_in_sync == 1 and not isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return True
    if method == "natural":
        logging.warning(
            "XLA is off: natural training under tf.distribute (%d replicas) is not "
            "XLA-compiled (Keras disables it, keras-team/keras#18716); training goes on.",
            strategy.num_replicas_in_sync,
        )
        return False
    logging.info(
        "XLA: each of the %d replicas compiles its own forward/backward; the all-reduce "
        "stays outside XLA.",
        strategy.num_replicas_in_sync,
    )
    return "per_replica"


# Steps per call for about 100 ms per call on one GPU (--steps_per_loop=0), from a step's
# estimated time at the flagfiles' batch with XLA and mixed precision: the small CNN ~1-2 ms,
# PreAct ResNet-18 on CIFAR ~10-15 ms; WRN-32-10 and the ImageNet ResNets take 100 ms or more
# a step, so one step per call already amortises the dispatch.
# (Keras's maintainers planned the same rule for fit: https://github.com/tensorflow/tensorflow/pull/41742)
AUTO_STEPS_PER_LOOP = {"small_cnn": 64, "preact_resnet18": 8}


def resolve_steps_per_loop(setting: int, model: str) -> int:
    """--steps_per_loop, or (0) 1 on CPU-only machines and the model's estimate on GPUs/TPUs."""
    if setting:
        return setting
    if not (tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")):
        return 1  # the step dominates a CPU step's time: nothing to amortise
    return AUTO_STEPS_PER_LOOP.get(model, 1)


def set_up(config: TrainConfig) -> None:
    """Seeds, op determinism and the mixed-precision policy, before the model is built."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    # fp16 wraps the optimizer in a LossScaleOptimizer at compile(); the input
    # gradient stays scaled, which only its sign survives (attacks.gradient_sign).
    keras.mixed_precision.set_global_policy(PRECISIONS[config.mixed_precision])
