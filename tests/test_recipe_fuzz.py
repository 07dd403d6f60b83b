"""Property-based tests of the recipe reader: random mutations of every shipped recipe, of its data and of its
text, end in either a valid recipe or one clean RecipeError, within a time and memory bound, never a traceback."""

import copy
import time
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipes.recipe_base import MAX_ERROR_LINES, MAX_LINE_CHARS
from recipes.recipe_yaml import load_recipe_yaml
from recipes.schema import RECIPES_DIR, RecipeError, load_recipe

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))
SECONDS_PER_RECIPE = 5.0
PEAK_BYTES_PER_RECIPE = 64 << 20

values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**12, -1, 0, 1, 2**32, 2**64, 0.5, 1e-300, "1e-4", "0.5", "true", "", "garbage_1x1", "0x4",
                     "1x0", "2:4", "4:2", "1:1", "channelx1", "mha", "wanda", "sparse_gpt", "mask_search", "..",
                     "/", "/etc/passwd", "n" * 300, "(", "[a-"]),
    st.text(max_size=40), st.lists(st.integers(-5, 5), max_size=3), st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
# (kind, which place, new value, new key): applied to the recipe's data at a place chosen by index
data_mutations = st.tuples(st.sampled_from(["replace", "delete", "add"]), st.integers(0, 10**6), values,
                           st.text(min_size=1, max_size=12))
# (kind, where, what): applied to the recipe's text
text_mutations = st.tuples(st.sampled_from(["insert", "delete", "duplicate_line", "drop_line", "alias"]),
                           st.integers(0, 10**6), st.text(max_size=8))


def places(node, path=()):
    """Every (container, key) pair of a parsed YAML document, depth first."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield node, key
            yield from places(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield node, index
            yield from places(child, (*path, index))


def mutate_data(data, mutations):
    data = copy.deepcopy(data)
    for kind, where, value, new_key in mutations:
        found = list(places(data))
        if not found:
            break
        container, key = found[where % len(found)]
        if kind == "replace":
            container[key] = value
        elif kind == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[new_key] = value
        else:
            container.append(value)
    return data


def mutate_text(text, mutations):
    for kind, where, what in mutations:
        lines = text.splitlines(keepends=True) or [""]
        line = where % len(lines)
        if kind == "insert":
            position = where % (len(text) + 1)
            text = text[:position] + what + text[position:]
        elif kind == "delete":
            position = where % (len(text) + 1)
            text = text[:position] + text[position + 1 + len(what):]
        elif kind == "duplicate_line":
            text = "".join(lines[: line + 1] + lines[line:])
        elif kind == "drop_line":
            text = "".join(lines[:line] + lines[line + 1:])
        else:  # an anchor and a nested alias to it, the start of alias expansion
            text = "".join(lines[:line]) + f"x: &x [{what!r}, {what!r}]\ny: &y [*x, *x, *x]\n" + "".join(lines[line:])
    return text


def check_reads_cleanly(path):
    """load_recipe ends in a recipe or one RecipeError of bounded size, in bounded time and memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        load_recipe(path)
    except RecipeError as err:
        lines = str(err).splitlines()
        assert lines and len(lines) <= MAX_ERROR_LINES + 2
        assert all(len(line) <= MAX_LINE_CHARS + 400 for line in lines), max(map(len, lines))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < SECONDS_PER_RECIPE
    assert peak < PEAK_BYTES_PER_RECIPE


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.stem)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(data_mutations, min_size=1, max_size=4))
def test_mutated_recipe_data_is_read_cleanly(tmp_path, shipped, mutations):
    data = mutate_data(load_recipe_yaml(shipped), mutations)
    path = tmp_path / shipped.name
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    check_reads_cleanly(path)


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.stem)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(text_mutations, min_size=1, max_size=3))
def test_mutated_recipe_text_is_read_cleanly(tmp_path, shipped, mutations):
    path = tmp_path / shipped.name
    path.write_text(mutate_text(shipped.read_text(encoding="utf-8"), mutations), encoding="utf-8",
                    errors="surrogatepass")
    check_reads_cleanly(path)


def test_every_shipped_recipe_reads_unchanged():
    for shipped in SHIPPED:
        load_recipe(shipped)
