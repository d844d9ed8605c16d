"""The config (each setting declared once) and the run folder, as units."""

import dataclasses
import json
import os

import pytest
from absl import flags as absl_flags

from tf_free import config as config_lib
from tf_free import experiment, models, run_folder
from tf_free.config import ConfigError, TrainConfig

# config.json as tf_free 0.1.x wrote it (before model_hparams): a natural run of
# scripts/reproduce_fashion_mnist.py, copied from a real run folder.
CONFIG_0_1 = {
    "allow_large_epsilon": False, "batch_size": 128, "checkpoint_every": 200,
    "cpu_devices": 1, "crop_padding": 4, "data_dir": None, "dataset": "fashion_mnist",
    "deterministic": False, "epochs": 8, "epsilon": 25.5, "eval_attack": "pgd",
    "eval_every": 1000, "eval_examples": 1000, "eval_pgd_step_size": 2.55,
    "eval_pgd_steps": 20, "export_dir": None, "free_delta_projection": "valid_image",
    "iterations": None, "jit_compile": "auto", "lr": 0.05, "lr_boundaries": [],
    "lr_boundary_unit": "epochs", "lr_decay": 0.1, "lr_schedule": "cosine", "m": 8,
    "method": "natural", "mixed_precision": "none", "model": "small_cnn",
    "model_dir": "runs/fashion_mnist/natural", "momentum": 0.9, "overwrite": False,
    "pgd_attack_bn": "train", "pgd_step_size": None, "pgd_steps": 7, "seed": 0,
    "step_size": None, "strategy": "auto", "train_examples": None, "verbose": 2,
    "weight_decay": 0.0, "weight_decay_vars": "kernels", "wrn_depth": 32, "wrn_width": 10,
}  # fmt: skip


def _flags(*args) -> TrainConfig:
    """The config `python -m tf_free.train <args>` would run."""
    from tf_free import train  # noqa: F401 - defines the flags

    absl_flags.FLAGS.unparse_flags()
    try:
        absl_flags.FLAGS(["train", *args])
        return config_lib.from_flags(absl_flags.FLAGS)
    finally:
        absl_flags.FLAGS.unparse_flags()


# --- One declaration per setting ---------------------------------------------


def test_every_setting_has_a_flag_with_its_declared_help_and_default():
    _flags()  # defines them
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_hparams":
            continue
        flag = absl_flags.FLAGS[field.name]
        assert flag.help.endswith(field.metadata["help"]), field.name  # enums prefix <a|b>
        default = field.default
        assert flag.default == (list(default) if isinstance(default, tuple) else default)
    for spec in models.MODELS.values():
        for hparam in spec.hyperparameters.values():
            assert absl_flags.FLAGS[hparam.flag].default == hparam.default


def test_flag_defaults_give_the_dataclass_defaults():
    assert _flags() == TrainConfig()


def test_model_hyperparameters_travel_with_the_model():
    wrn = _flags("--model=wide_resnet", "--wrn_depth=14", "--wrn_width=2")
    assert wrn.model_hparams == {"depth": 14, "width": 2}
    # Another model takes none of them, whatever the flags say.
    assert _flags("--model=small_cnn", "--wrn_depth=14").model_hparams == {}
    with pytest.raises(ConfigError, match="--wrn_depth must be 6n\\+2"):
        TrainConfig(model="wide_resnet", model_hparams={"depth": 30}).validate()
    with pytest.raises(ConfigError, match="has no hyperparameters \\['depth'\\]"):
        TrainConfig(model="small_cnn", model_hparams={"depth": 14}).validate()


def _bounded_fields():
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        for key, offset in (("minimum", -1), ("above", 0), ("below", 0)):
            if meta.get(key) is not None:
                yield pytest.param(field.name, meta[key] + offset, id=f"{field.name}-{key}")


@pytest.mark.parametrize("name, bad", list(_bounded_fields()))
def test_each_declared_bound_is_enforced_with_the_flag_name(name, bad):
    config = TrainConfig(**{name: bad})
    with pytest.raises(ConfigError, match=f"^--{name} must"):
        config.validate()


@pytest.mark.parametrize(
    "name, bad",
    [("epsilon", float("nan")), ("lr", float("inf")), ("m", 2.5), ("seed", True), ("verbose", 3)],
)
def test_non_finite_non_integer_and_unlisted_values_are_rejected(name, bad):
    with pytest.raises(ConfigError, match=f"^--{name} must"):
        TrainConfig(**{name: bad}).validate()


def test_runtime_settings_are_those_declared_runtime():
    # They may change between a run and its resumption; nothing else may.
    assert config_lib.RUNTIME_FIELDS == {
        "data_dir", "model_dir", "export_dir", "strategy", "jit_compile", "cpu_devices",
        "deterministic", "checkpoint_every", "steps_per_loop", "overwrite", "allow_large_epsilon",
        "eval_every",
        "eval_attack", "eval_examples", "eval_pgd_steps", "eval_pgd_step_size", "verbose",
        "eval_every_iterations", "log_every",
    }  # fmt: skip


# --- config.json of earlier versions -------------------------------------------


@pytest.mark.slow
def test_a_0_1_config_json_reads_as_the_same_run():
    old = config_lib.from_json_dict(CONFIG_0_1)
    assert old.model_hparams == {}
    now = TrainConfig(method="natural", model_dir="elsewhere", eval_every=1)
    assert config_lib.differences(old, now) == []
    wrn = config_lib.from_json_dict({**CONFIG_0_1, "model": "wide_resnet", "wrn_depth": 14})
    assert wrn.model_hparams == {"depth": 14, "width": 10}
    assert config_lib.differences(wrn, _flags("--method=natural", "--model=wide_resnet")) == [
        "model_hparams={'depth': 14, 'width': 10} there, {'depth': 32, 'width': 10} now"
    ]


def test_a_setting_missing_from_an_old_file_takes_its_legacy_value():
    older = {k: v for k, v in CONFIG_0_1.items() if k not in ("pgd_attack_bn", "weight_decay_vars")}
    old = config_lib.from_json_dict({**older, "method": "pgd", "weight_decay": 5e-4})
    assert (old.pgd_attack_bn, old.weight_decay_vars) == ("inference", "keras_decoupled")
    found = config_lib.differences(old, TrainConfig(method="pgd", weight_decay=5e-4))
    assert found == [
        "pgd_attack_bn='inference' there, 'train' now",
        "weight_decay_vars='keras_decoupled' there, 'kernels' now",
    ]


@pytest.mark.slow
def test_a_run_with_a_0_1_config_json_resumes(tmp_path):
    """A finished run whose config.json is in the 0.1 format is evaluated and exported
    again (not refused as another run), with the same weights."""
    model_dir = str(tmp_path / "run")
    tiny = dict(
        method="natural", epochs=1, batch_size=64, train_examples=128, eval_examples=64,
        eval_pgd_steps=2, verbose=0, model_dir=model_dir,
    )  # fmt: skip
    first = experiment.train_and_evaluate(TrainConfig(**tiny))
    path = os.path.join(model_dir, "config.json")
    saved = json.load(open(path))
    saved.pop("model_hparams")
    with open(path, "w") as f:
        json.dump({**saved, "wrn_depth": 32, "wrn_width": 10}, f)
    again = experiment.train_and_evaluate(TrainConfig(**tiny))
    assert again["resumed"] and again["weights_sha256"] == first["weights_sha256"]


# --- The run folder ------------------------------------------------------------


def test_labels():
    assert run_folder.label(TrainConfig(method="free", m=4)) == "free m=4"
    assert run_folder.label(TrainConfig(method="pgd", pgd_steps=7)) == "PGD-7"
    assert run_folder.label(TrainConfig(method="natural")) == "natural"


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found: is .* a tf_free.train run"):
        run_folder.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        run_folder.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_0_1))
    assert run_folder.read_config(str(tmp_path)).method == "natural"


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    run_folder.write_json(path, {"a": 1})
    run_folder.write_json(path, {"a": 2})
    assert json.load(open(path)) == {"a": 2}
    assert os.listdir(tmp_path) == ["results.json"]


def test_prepare_refuses_another_run_and_touches_nothing(tmp_path):
    model_dir = str(tmp_path)
    saved = TrainConfig(m=4, model_dir=model_dir)
    run_folder.write_config(saved)
    before = open(os.path.join(model_dir, "config.json")).read()
    run_folder.prepare(TrainConfig(m=4, model_dir=model_dir, eval_examples=5))  # runtime only
    with pytest.raises(ConfigError, match="holds another run \\(m=4 there, 8 now\\)"):
        run_folder.prepare(TrainConfig(m=8, model_dir=model_dir))
    assert open(os.path.join(model_dir, "config.json")).read() == before
    run_folder.prepare(TrainConfig(m=8, model_dir=model_dir, overwrite=True))
    assert not os.path.exists(os.path.join(model_dir, "config.json"))


def test_locked_takes_the_folder_lock_once(tmp_path):
    config = TrainConfig(model_dir=str(tmp_path / "run"))
    with run_folder.locked(config):
        assert os.path.isdir(config.model_dir)
        with pytest.raises(ConfigError, match="in use|locked|running"):
            with run_folder.locked(config):
                pass
    with run_folder.locked(config):  # released
        pass


def test_free_training_at_epsilon_zero_builds():
    """ε=0 (natural training replayed m times, the paper's Fig. 1) is a valid run."""
    config = TrainConfig(method="free", epsilon=0.0, m=4)
    config.validate()
    model, _ = experiment.build_model(config, experiment.dataset_info(config))
    assert (model.epsilon, model.step_size, model.replays) == (0.0, 0.0, 4)
