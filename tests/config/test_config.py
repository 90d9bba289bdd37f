"""The run configuration as a user meets it: YAML files, dotted overrides, one-line errors."""

from pathlib import Path

import pytest
import yaml

from stalwart.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def config_error(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides or [])
    message = str(caught.value)
    assert "\n" not in message, f"a config error must fit on one line: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# Errors name the dotted key, the value and the fix


def test_typo_key_names_the_dotted_key_and_suggests_the_right_one():
    message = config_error(["trainer.max_step=5"])
    assert "'trainer.max_step'" in message
    assert "did you mean 'max_steps'" in message


def test_typo_section_suggests_the_section():
    message = config_error(["modle.depth=3"])
    assert "'modle'" in message and "did you mean 'model'" in message


def test_typo_in_a_nested_section_names_the_full_path():
    message = config_error(["snapshot.erasure.partiy=1"])
    assert "'snapshot.erasure.partiy'" in message and "did you mean 'parity'" in message


def test_wrong_type_names_key_and_value():
    message = config_error(["trainer.max_steps=abc"])
    assert "'trainer.max_steps'" in message and '"abc"' in message and "integer" in message


def test_fractional_value_for_an_integer_is_rejected():
    message = config_error(["trainer.batch_size=5.5"])
    assert "'trainer.batch_size'" in message and "5.5" in message


def test_out_of_range_value_names_key_value_and_bound():
    message = config_error(["optim.lr=-1"])
    assert "'optim.lr'" in message and "-1" in message and "greater than 0" in message


def test_literal_choice_lists_the_allowed_values():
    message = config_error(["parallel.strategy=zero9"])
    assert "'parallel.strategy'" in message and "zero9" in message
    for allowed in ("none", "ddp", "fsdp"):
        assert allowed in message


def test_error_inside_a_list_names_the_index():
    message = config_error(["faults.events=[{kind: kill_wroker, step: 3}]"])
    assert "'faults.events.0.kind'" in message and "kill_worker" in message


def test_cross_field_rule_names_both_fields():
    message = config_error(["snapshot.erasure.group_size=4", "snapshot.erasure.parity=4"])
    assert "snapshot.erasure.parity" in message and "snapshot.erasure.group_size" in message


def test_batch_must_divide_into_ranks_and_micro_batches():
    message = config_error(
        ["trainer.batch_size=6", "parallel.world_size=2", "trainer.grad_accum_steps=2"]
    )
    assert "trainer.batch_size" in message and "(4)" in message


def test_hf_model_needs_a_source():
    message = config_error(["model.kind=hf"])
    assert "model.path" in message and "model.hf_config" in message


def test_several_errors_are_reported_together_on_one_line():
    message = config_error(["optim.lr=-1", "trainer.max_steps=0"])
    assert "'optim.lr'" in message and "'trainer.max_steps'" in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------
# Overrides


def test_override_values_are_yaml_scalars_and_lists():
    tree = apply_overrides(
        {},
        [
            "a.integer=3",
            "a.number=0.5",
            "a.flag=true",
            "a.items=[1, x]",
            "a.nothing=null",
            "a.text=hello",
            "a.mapping={x: 1}",
            "b=2",
        ],
    )
    assert tree == {
        "a": {
            "integer": 3,
            "number": 0.5,
            "flag": True,
            "items": [1, "x"],
            "nothing": None,
            "text": "hello",
            "mapping": {"x": 1},
        },
        "b": 2,
    }
    assert type(tree["a"]["integer"]) is int and type(tree["a"]["flag"]) is bool


def test_overrides_reach_typed_fields():
    config = load_config(
        None,
        [
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; the field still gets a float
            "trainer.precision=bf16",
            "model.hf_config={model_type: llama, hidden_size: 32}",
            "faults.events=[{kind: kill_node, step: 4, node: 1}]",
            "cluster.address=null",
        ],
    )
    assert config.optim.lr == pytest.approx(1e-3) and isinstance(config.optim.lr, float)
    assert config.trainer.precision == "bf16"
    assert config.model.hf_config == {"model_type": "llama", "hidden_size": 32}
    assert config.faults.events[0].kind == "kill_node" and config.faults.events[0].node == 1
    assert config.cluster.address is None


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  max_steps: 7\n  batch_size: 8\n")
    config = load_config(path, ["trainer.max_steps=9"])
    assert config.trainer.max_steps == 9 and config.trainer.batch_size == 8


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.max_steps", "key.path=value"),
        ("=3", "key.path=value"),
        ("trainer.max_steps=[1", "cannot parse override value '[1'"),
    ],
)
def test_malformed_overrides(override, fragment):
    assert fragment in config_error([override])


def test_override_below_a_value_is_refused():
    with pytest.raises(ConfigError, match="trainer.max_steps is a value, not a section"):
        apply_overrides({"trainer": {"max_steps": 3}}, ["trainer.max_steps.inner=1"])


# ---------------------------------------------------------------------------------------------
# Files


def test_save_then_load_round_trips(tmp_path):
    config = load_config(
        None,
        [
            "name=roundtrip",
            "model.depth=3",
            "model.tie_embeddings=true",
            "optim.lr=2.5e-4",
            "trainer.precision=bf16",
            "parallel.strategy=fsdp",
            "parallel.world_size=4",
            "trainer.batch_size=8",
            "snapshot.erasure.group_size=3",
            "snapshot.erasure.parity=2",
            "faults.events=[{kind: kill_worker, step: 2, rank: 1}]",
            "quant.recipe=mxint8",
        ],
    )
    written = save_config(config, tmp_path / "run")
    assert written == tmp_path / "run" / "config.yaml"
    assert sorted(p.name for p in written.parent.iterdir()) == ["config.yaml"]  # no temp left
    reloaded = load_config(written)
    assert reloaded == config
    assert reloaded.to_dict() == config.to_dict()
    assert yaml.safe_load(written.read_text()) == config.to_dict()


def test_defaults_survive_a_round_trip(tmp_path):
    config = RunConfig()
    assert load_config(save_config(config, tmp_path)) == config
    assert config_from_dict(config.to_dict()) == config


def test_missing_file():
    message = config_error(path="/nonexistent/run.yaml")
    assert "/nonexistent/run.yaml" in message and "does not exist" in message


def test_invalid_yaml_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  max_steps: [1\n  batch_size: 2\n")
    message = config_error(path=path)
    assert str(path) in message and "not valid YAML" in message and "line 3" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- trainer\n- model\n")
    assert "top level must be a mapping" in config_error(path=path)


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


def test_typo_in_a_file_names_the_dotted_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    message = config_error(path=path)
    assert "'optim.learning_rate'" in message and "allowed:" in message and "lr" in message


@pytest.mark.parametrize("name", ["tiny.yaml", "two_node.yaml", "hf_tiny.yaml"])
def test_examples_are_valid(name):
    config = load_config(EXAMPLES / name)
    assert config.name == Path(name).stem


def test_two_node_example_describes_two_simulated_nodes_with_snapshots():
    config = load_config(EXAMPLES / "two_node.yaml")
    assert config.cluster.num_nodes == 2 and config.cluster.workers_per_node == 1
    assert config.parallel.strategy == "ddp" and config.parallel.world_size == 2
    assert config.snapshot.enabled


def test_elastic_with_fsdp_is_refused_before_any_work():
    message = config_error(["parallel.strategy=fsdp", "cluster.elastic=true"])
    assert "cluster.elastic: true needs parallel.strategy: ddp" in message
