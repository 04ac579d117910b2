"""Config composition: typed schemas, overrides, one-line errors naming key and allowed values."""

from __future__ import annotations

import pytest

from fedmed.cli import main
from fedmed.config.schema import (
    FederationConfig,
    FedMedConfig,
    ImageConfig,
    ModelConfig,
    ModelName,
    Partition,
    SklearnConfig,
    StrategyName,
    TabularConfig,
)
from fedmed.errors import ConfigError, FedMedError
from fedmed.provenance import config_hash
from fedmed.runs.compose import compose_config


def error_of(compose, *overrides: str) -> FedMedError:
    with pytest.raises(FedMedError) as info:
        compose(*overrides)
    message = str(info.value)
    assert "\n" not in message, f"config errors must be one line, got {message!r}"
    return info.value


# ----------------------------------------------------------------------------- valid configs
def test_default_config_is_typed_heart_svm(compose):
    cfg = compose()
    assert type(cfg) is FedMedConfig
    assert type(cfg.dataset) is TabularConfig
    assert isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.federation, FederationConfig)
    assert cfg.dataset.name == "heart"
    assert cfg.dataset.label == "num"
    assert len(cfg.dataset.paths) == 4
    assert cfg.dataset.site_names == ["cleveland", "hungary", "switzerland", "va"]
    # Enums are real enum members, not strings
    assert cfg.model.name is ModelName.svm
    assert cfg.strategy.name is StrategyName.fedavg
    assert cfg.dataset.partition is Partition.iid
    assert cfg.federation.num_sites is None
    assert isinstance(cfg.federation.rounds, int)


def test_group_and_value_overrides(compose):
    cfg = compose("dataset=pneumonia", "model=cnn", "federation.rounds=3", "seed=7")
    assert type(cfg.dataset) is ImageConfig
    assert cfg.dataset.name == "pneumonia"
    assert cfg.dataset.channels == 1
    assert cfg.dataset.num_classes == 2
    assert cfg.model.name is ModelName.cnn
    assert cfg.model.momentum == pytest.approx(0.9)  # from conf/model/cnn.yaml
    assert cfg.federation.rounds == 3
    assert cfg.seed == 7


def test_enum_override_is_converted(compose):
    cfg = compose("dataset=pneumonia", "dataset.partition=dirichlet", "dataset.alpha=0.3")
    assert cfg.dataset.partition is Partition.dirichlet
    assert cfg.dataset.alpha == pytest.approx(0.3)


def test_sklearn_dataset_is_typed(compose):
    cfg = compose("dataset=breast_cancer", "model=logreg")
    assert type(cfg.dataset) is SklearnConfig
    assert cfg.model.name is ModelName.logreg


def test_baseline_config_composes(compose):
    cfg = compose("mode=local", config_name="baseline")
    assert cfg.mode.value == "local"
    assert isinstance(cfg, FedMedConfig)


# ----------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("federation.foo=1", "federation.foo", ["rounds", "num_sites", "fraction", "local_epochs"]),
        ("foo=1", "foo", ["seed", "dataset", "model", "federation"]),
        ("model.lrr=0.1", "model.lrr", ["lr", "batch_size", "momentum"]),
        ("dataset.lable=x", "dataset.lable", ["label", "paths", "header"]),
    ],
)
def test_unknown_key_names_key_and_allowed_keys(compose, override, key, allowed):
    err = error_of(compose, override)
    message = str(err)
    assert f"'{key}'" in message
    for name in allowed:
        assert name in message


# ----------------------------------------------------------------------------- bad values
def test_bad_enum_value_names_key_and_allowed_values(compose):
    message = str(error_of(compose, "dataset=pneumonia", "dataset.partition=xx"))
    assert "dataset.partition" in message
    assert "xx" in message
    assert "iid" in message
    assert "dirichlet" in message


def test_bad_type_names_key(compose):
    message = str(error_of(compose, "federation.rounds=abc"))
    assert "federation.rounds" in message


def test_bad_group_option_lists_real_options_only(compose):
    message = str(error_of(compose, "dataset=nope"))
    assert "dataset=nope" in message
    for option in ("breast_cancer", "csv", "heart", "medmnist", "pneumonia"):
        assert option in message
    assert "_schema" not in message


def test_bad_model_option_lists_models(compose):
    message = str(error_of(compose, "model=resnet"))
    for option in ("cnn", "logreg", "svm"):
        assert option in message
    assert "_schema" not in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.fraction=1.5", "federation.fraction"),
        ("federation.fraction=0", "federation.fraction"),
        ("federation.evaluate_fraction=0", "federation.evaluate_fraction"),
        ("federation.round_timeout=0", "federation.round_timeout"),
        ("federation.connect_timeout=-1", "federation.connect_timeout"),
        ("federation.evaluate_fraction=2", "federation.evaluate_fraction"),
        ("federation.rounds=0", "federation.rounds"),
        ("federation.min_sites=0", "federation.min_sites"),
        ("federation.local_epochs=0", "federation.local_epochs"),
        ("model.lr=-1", "model.lr"),
        ("model.batch_size=0", "model.batch_size"),
        ("model.momentum=1.0", "model.momentum"),
        ("dataset.alpha=0", "dataset.alpha"),
        ("dataset.test_fraction=1.0", "dataset.test_fraction"),
        ("strategy.beta1=1.0", "strategy.beta1"),
    ],
)
def test_out_of_range_value_raises_config_error_naming_key(compose, override, key):
    err = error_of(compose, override)
    assert isinstance(err, ConfigError)
    assert err.key == key
    assert key in str(err)
    assert "expected" in str(err)


def test_boundary_values_are_accepted(compose):
    cfg = compose("federation.fraction=1.0", "federation.rounds=1", "model.momentum=0")
    assert cfg.federation.fraction == 1.0
    assert cfg.federation.rounds == 1


def test_csv_without_label_names_dataset_label(compose):
    err = error_of(compose, "dataset=csv", "dataset.path=/some/file.csv")
    assert isinstance(err, ConfigError)
    assert "dataset.label" in str(err)


def test_medmnist_without_path_names_dataset_path(compose):
    err = error_of(compose, "dataset=medmnist")
    assert "dataset.path" in str(err)


def test_csv_needs_exactly_one_of_path_and_paths(compose):
    err = error_of(compose, "dataset=csv", "dataset.label=y")
    assert isinstance(err, ConfigError)
    assert err.key == "dataset.paths"


def test_num_sites_must_match_natural_federation(compose):
    err = error_of(compose, "federation.num_sites=7")
    assert isinstance(err, ConfigError)
    assert "federation.num_sites" in str(err)
    assert "4" in str(err)  # heart's own number of sites
    assert compose("federation.num_sites=4").federation.num_sites == 4


def test_num_sites_free_for_partitioned_sources(compose):
    assert compose("dataset=pneumonia", "federation.num_sites=7").federation.num_sites == 7


# ----------------------------------------------------------------------------- CLI
def test_cli_unknown_key_exits_2_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any output folder a simulation made would land here
    rc = main(["simulate", "foo=1"])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "foo" in lines[0]
    assert "seed" in lines[0]
    assert "global model" not in captured.out  # no simulation ran
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_command_exits_2(capsys):
    assert main(["simulat"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "simulate" in err


def test_config_hash_names_the_configuration_not_the_object() -> None:
    first = compose_config(["dataset=heart", "model=svm"])
    again = compose_config(["dataset=heart", "model=svm"])
    other = compose_config(["dataset=heart", "model=svm", "federation.rounds=7"])
    assert config_hash(first) == config_hash(again) == config_hash(first)
    assert config_hash(other) != config_hash(first)
    assert len(config_hash(first)) == 64


def test_the_dp_image_recipe_sets_what_it_documents(compose):
    cfg = compose("dataset=pneumonia", "privacy=dp", "+recipe=dp_image")
    assert cfg.model.name is ModelName.scatter
    assert (cfg.model.batch_size, cfg.model.lr, cfg.federation.rounds) == (64, 0.4, 10)
    assert cfg.privacy.max_grad_norm == 1.0 and cfg.evaluation.threshold == "youden"
    assert list(cfg.privacy.evaluation_margin_edges) == list(range(-2, 13))
