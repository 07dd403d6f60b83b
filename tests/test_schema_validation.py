"""The recipe schema: clear errors for unknown keys, bad types, impossible sparsities, unknown pruners and patterns
that do not fit a layer; the validate command, the JSON Schema file, and a fuzz test of the validator."""

import json

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.tiny_models import tiny_bert_classifier
from recipes import validate
from recipes.recipe_yaml import load_recipe_yaml
from recipes.schema import RECIPES_DIR, RecipeError, load_recipe, parse_recipe
from recipes.shape_checks import check_pattern_fits


def recipe(**stage):
    return {"name": "r", "model": {"asset": "minilm-l6"},
            "pruning": [{"pruning_type": "wanda", "pattern": "1x1", "target_sparsity": 0.5, **stage}]}


def block_recipe(**stage):
    """A stage of a pruner that takes any block pattern (INC's magnitude, training-aware)."""
    return recipe(pruning_type="magnitude", training_steps=10, **stage)


def refused(data) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    return str(caught.value)


@pytest.mark.parametrize(("where", "typo", "suggestion"), [
    ((), "pruneing", "pruning"),
    (("data",), "text_colum", "text_column"),
    (("model",), "trust_remote_cod", "trust_remote_code"),
    (("pruning", 0), "comparision_group", "comparison_group"),
])
def test_unknown_keys_name_the_place_and_the_nearest_key(where, typo, suggestion):
    data = recipe()
    data.setdefault("data", {})
    node = data
    for part in where:
        node = node[part]
    node[typo] = 1
    message = refused(data)
    assert f"unknown key '{'.'.join(map(str, (*where, typo)))}'. Did you mean '{suggestion}'?" in message
    assert "Allowed here:" in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"target_sparsity": "half"}, r"'pruning\.0\.target_sparsity': Input should be a valid number.*'half'"),
    ({"batch_size": 2.5}, r"'pruning\.0\.batch_size': Input should be a valid integer"),
    ({"op_names": "bert.encoder"}, r"'pruning\.0\.op_names': Input should be a valid list"),
])
def test_bad_types_are_named(change, expected):
    assert __import__("re").search(expected, refused(recipe(**change)))


def test_a_recipe_must_be_a_mapping_and_pruning_a_list():
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping of keys, got list"):
        parse_recipe([1, 2])
    data = recipe()
    data["pruning"] = {"pruning_type": "wanda"}
    assert "'pruning': Input should be a valid list" in refused(data)


@pytest.mark.parametrize(("change", "expected"), [
    ({"target_sparsity": 1.0}, "less than 1"),
    ({"target_sparsity": -0.1}, "greater than or equal to 0"),
    ({"pattern": "2:4", "target_sparsity": 0.6}, "target_sparsity 0.6 is above what pattern '2:4' can reach (2/4)"),
    ({"pattern": "4:2"}, "N:M prunes N of every M weights, so it needs 0 < N < M"),
    ({"pattern": "4by1"}, "pattern '4by1' is not understood"),
])
def test_impossible_sparsities_and_patterns_are_refused_before_loading(change, expected):
    assert expected in refused(recipe(**change))


@pytest.mark.parametrize(("name", "suggestion"), [("wandaa", "wanda"), ("snip_momentun", "snip_momentum"),
                                                  ("sparsegpt", "sparse_gpt"), ("mask-search", "mask_search")])
def test_unknown_pruner_names_suggest_the_nearest(name, suggestion):
    message = refused(recipe(pruning_type=name))
    assert f"unknown pruning_type {name!r}. Did you mean {suggestion!r}?" in message and "Allowed: " in message


def test_training_aware_pruners_need_a_step_budget():
    assert "set training_steps >= 1" in refused(recipe(pruning_type="magnitude", pattern="4x1"))
    parse_recipe(recipe(pruning_type="magnitude", pattern="4x1", training_steps=10))


@pytest.mark.parametrize(("pattern", "layer", "shape"), [
    ("3x1", "bert.encoder.layer.0.attention.self.query", "[32, 32]"),
    ("1x5", "bert.encoder.layer.0.attention.self.query", "[32, 32]"),
    ("2:6", "bert.encoder.layer.0.attention.self.query", "[32, 32]"),
])
def test_a_pattern_that_does_not_tile_a_layer_is_refused_naming_layer_shape_and_pattern(pattern, layer, shape):
    model = tiny_bert_classifier()  # hidden 32, FFN 64
    stage = parse_recipe(block_recipe(pattern=pattern, target_sparsity=0.3, op_names=["bert.encoder"])).pruning[0]
    with pytest.raises(RecipeError) as caught:
        check_pattern_fits(model, stage, "pruning stage 0 (magnitude)")
    message = str(caught.value)
    assert f"pattern {pattern!r} does not fit layer {layer!r} with weight shape {shape}" in message
    assert message.startswith("pruning stage 0 (magnitude): ")


def test_patterns_that_tile_every_selected_layer_pass():
    model = tiny_bert_classifier()
    for pattern in ("1x1", "4x1", "1x16", "2:4", "4:8", "channelx1"):
        stage = parse_recipe(block_recipe(pattern=pattern, target_sparsity=0.3, op_names=["bert.encoder"])).pruning[0]
        check_pattern_fits(model, stage, "stage")
    # the task head (2 outputs) is kept dense by every pruner, so a 4x1 pattern need not tile it
    stage = parse_recipe(block_recipe(pattern="4x1", target_sparsity=0.3)).pruning[0]
    check_pattern_fits(model, stage, "stage")


def test_every_shipped_recipe_validates():
    shipped = sorted(RECIPES_DIR.glob("*.yaml"))
    assert len(shipped) >= 2
    assert validate.main([str(path) for path in shipped]) == 0


def test_validate_reports_each_bad_file_and_exits_non_zero(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(recipe()))
    bad.write_text(yaml.safe_dump(recipe(target_sparsty=0.5)))
    assert validate.main([str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert f"ok: r ({good})" in out and "Did you mean 'target_sparsity'?" in err


@pytest.mark.parametrize("shipped", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_against_the_exported_json_schema(shipped):
    schema = json.loads((RECIPES_DIR / "recipe.schema.json").read_text())
    jsonschema.validate(load_recipe_yaml(shipped), schema)  # editors check recipes with this schema


def test_the_json_schema_refuses_what_the_validator_refuses():
    schema = json.loads((RECIPES_DIR / "recipe.schema.json").read_text())
    for bad in ({**recipe(), "pruneing": []}, {**recipe(), "task": "image_classification"},
                recipe(target_sparsity=True), recipe(calibration_samples=10**12)):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_the_checked_in_json_schema_is_current():
    checked_in = (RECIPES_DIR / "recipe.schema.json").read_text()
    assert checked_in == validate.json_schema_text(), (
        "recipes/recipe.schema.json is stale: python -m recipes.validate --json-schema > recipes/recipe.schema.json")
    schema = json.loads(checked_in)
    assert "wanda" in schema["$defs"]["PruningStage"]["properties"]["pruning_type"]["enum"]
    members = [schema["$defs"][ref["$ref"].rsplit("/", 1)[1]] for ref in schema["anyOf"]]
    assert {member["properties"]["task"]["const"] for member in members} == {
        "text_classification", "causal_lm", "image_classification"}
    assert all(member["additionalProperties"] is False for member in members)


def test_recipes_are_read_with_safe_load(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    marker = tmp_path / "executed"
    hostile.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(hostile)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_the_recipe_sets_it():
    assert parse_recipe(recipe()).model.trust_remote_code is False
    data = recipe()
    data["model"]["trust_remote_code"] = True
    assert parse_recipe(data).model.trust_remote_code is True


# ------------------------------------------------------------------------------------------------------- fuzzing

KEYS = ["name", "model", "data", "pruning", "pruning_type", "target_sparsity", "pattern", "asset", "path", "hub_id",
        "slim", "task", "corpus", "files", "train", "op_names", "training_steps", "text_column", "evaluation",
        "calibration", "x", "", "0"]
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12) \
    | st.sampled_from(["wanda", "2:4", "4x1", "minilm-l6", "mask_search", "causal_lm", "magnitude", "1x1", "0.5"])
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                                                                     children, max_size=6),
    max_leaves=25,
)
nearly_valid = st.fixed_dictionaries(
    {"name": st.sampled_from(["r", "bad name", 3]), "model": st.sampled_from([{"asset": "minilm-l6"}, {}, None]),
     "pruning": st.lists(st.dictionaries(st.sampled_from(KEYS), scalars, max_size=5) | st.fixed_dictionaries(
         {"pruning_type": st.sampled_from(["wanda", "mask_search", "magnitude", "sparse_gpt", "nope"]),
          "target_sparsity": scalars, "pattern": scalars}), max_size=3)},
    optional={"task": scalars, "slim": scalars, "corpus": documents, "data": documents},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents | nearly_valid)
def test_the_validator_raises_only_its_own_error_on_any_structure(document):
    try:
        parse_recipe(document)
    except RecipeError as err:
        assert str(err)


YAML_CORNERS = [
    "name: &x [*x]\nmodel: {asset: minilm-l6}\npruning: [*x]",  # a self-referencing list
    "&x {name: r, model: *x, pruning: [*x]}",
    "name: !!binary aGVsbG8=\nmodel: !!set {a, b}\npruning: [{target_sparsity: 2020-01-01}]",
    "? [1, 2]\n: x\nname: r",
    "name: r\npruning: [{pruning_type: wanda, pattern: '99999999999999999999:999999999999999999999'}]",
    "a: b: c", "\t- x", "%YAML 9.9\n---\nname: r", "--- 1\n--- 2", "\x00",
]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200) | st.sampled_from(YAML_CORNERS) | st.builds(yaml.safe_dump, documents | nearly_valid))
def test_the_validator_raises_only_its_own_error_on_any_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as err:
        assert str(err)


def test_layer_name_patterns_must_be_regular_expressions():
    assert "op_names entry '(' is not a valid regular expression" in refused(recipe(op_names=["("]))
    assert "excluded_op_names entry 'a[' is not a valid" in refused(recipe(excluded_op_names=["a["]))
