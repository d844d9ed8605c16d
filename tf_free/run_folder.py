"""A run folder (`--model_dir`): what it holds, its names, and whether a run may use it.

Layout: `config.json` (the run's settings), `checkpoints/`, `logs/`
(TensorBoard), `results.json`, `export/` (the SavedModel, unless
--export_dir), `eval.json` (tf_free.evaluate's results). A folder is new, or
holds this same run (which then resumes), or is replaced with --overwrite; a
folder with another run is an error that names the settings that differ and
touches nothing. One process at a time trains in a folder (`tf_free.run_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil

from absl import logging

from tf_free import export, run_lock
from tf_free.config import ConfigError, TrainConfig, differences, from_json_dict

# What a run folder holds; --overwrite removes exactly these.
RUN_FILES = ("config.json", "checkpoints", "logs", "results.json", "export", "eval.json")


def export_dir(config: TrainConfig) -> str:
    """Where the run's SavedModel goes: --export_dir, or <model_dir>/export."""
    return config.export_dir or os.path.join(config.model_dir, "export")


def checkpoint_dir(model_dir: str) -> str:
    """Where a run folder's checkpoints are."""
    return os.path.join(model_dir, "checkpoints")


def log_dir(model_dir: str) -> str:
    """Where a run folder's TensorBoard logs are."""
    return os.path.join(model_dir, "logs")


def label(config: TrainConfig) -> str:
    """The run's training method as tables name it: "free m=8", "PGD-7", "fast (FGSM-RS)"
    or "natural"."""
    if config.method == "free":
        return f"free m={config.m}"
    if config.method == "pgd":
        return f"PGD-{config.pgd_steps}"
    if config.method == "fast":
        return (
            "fast (FGSM-RS)" if config.fast_init == "random" else f"fast ({config.fast_init} start)"
        )
    return config.method


def read_config(model_dir: str) -> TrainConfig:
    """The `TrainConfig` a run folder was trained with (of this or an earlier version),
    with `model_dir` set to where the folder is now."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found: is {model_dir!r} a tf_free.train run?")
    try:
        with open(path) as f:
            config = from_json_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    # The folder may have moved since training: its files are where it is now.
    return dataclasses.replace(config, model_dir=model_dir)


def write_json(path: str, value) -> None:
    """Writes `value` to `path` atomically: a reader (or a kill) never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def write_config(config: TrainConfig) -> None:
    """`model_dir/config.json`, atomically (another worker may be reading it)."""
    path = os.path.join(config.model_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json())
    os.replace(path + ".tmp", path)


def check_writable(model_dir: str, create: bool = True) -> None:
    """Raises ConfigError unless `model_dir` exists (or can be made) and takes files.

    With `create=False` it only checks that no file stands in the way, and
    creates nothing.
    """
    ancestor = os.path.abspath(model_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--model_dir {model_dir!r} is not writable: {ancestor} is a file")
    if not create:
        return
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--model_dir {model_dir!r} is not writable: {e.strerror}") from e


def check_targets(config: TrainConfig) -> None:
    """Before any work: the run folder can take files and the export target is safe to use."""
    check_writable(config.model_dir, create=False)
    try:
        export.check_export_target(
            export_dir(config),
            config.model_dir,
            run_files=tuple(f for f in RUN_FILES if f != "export"),
        )
    except export.ExportTargetError as e:
        raise ConfigError(str(e)) from e


@contextlib.contextmanager
def locked(config: TrainConfig, chief: bool = True):
    """Holds the run folder's lock while the run trains (only the chief takes it: the
    workers of a multi-worker run join under the chief's lock). Creates the folder."""
    check_writable(config.model_dir)
    if not chief:
        yield
        return
    try:
        lock = run_lock.RunLock(config.model_dir).acquire()
    except run_lock.RunLockedError as e:
        raise ConfigError(str(e)) from e
    try:
        yield
    finally:
        lock.release()


def prepare(config: TrainConfig, chief: bool = True) -> None:
    """Checks that `model_dir` is new, or holds this same run (to resume), or --overwrite.

    With --overwrite (on the chief) the previous run's files are deleted,
    and so are a stranded export's staging folders.

    Raises ConfigError naming the settings that differ from the run already
    there; nothing in the folder is touched then.
    """
    path = os.path.join(config.model_dir, "config.json")
    if config.overwrite and chief:
        for name in RUN_FILES:
            target = os.path.join(config.model_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        export.remove_staging(export_dir(config))
        logging.info("--overwrite: removed the previous run in %s", config.model_dir)
    if os.path.exists(path) and not config.overwrite:
        try:
            with open(path) as f:
                old = from_json_dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(
                f"--model_dir {config.model_dir!r} holds an unreadable config.json ({e}); "
                "use another --model_dir, or --overwrite to start again there"
            ) from e
        found = differences(old, config)
        if found:
            raise ConfigError(
                f"--model_dir {config.model_dir!r} holds another run ("
                + "; ".join(found)
                + "). Use another --model_dir, or --overwrite to replace that run"
            )
