"""Reads a recipe's YAML safely: plain data only, with limits that a small hostile file cannot get around.

`yaml.safe_load` builds no Python objects, but on its own it still lets a few hundred bytes of nested aliases
expand into billions of nodes when the result is walked, lets 100,000 nested brackets overflow the stack, and keeps
the last of two equal keys without a word. This loader refuses each of those before validation sees the data.
"""

import re
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# A recipe is a few kilobytes; the limits are far above any real one and far below what hurts.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting of mappings and sequences
MAX_EXPANDED_NODES = 100_000  # nodes once every alias is expanded (what validation and messages walk)

# Numbers as YAML 1.2 reads them. PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, `2:4` is the
# base-60 number 124, `0x4` is 4 and `no` is false: a pattern or a name written without quotes would silently
# become a number or a boolean.
_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")  # no leading zeros: YAML 1.1 would read 010 as octal 8
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_BOOL = re.compile(r"^(true|True|TRUE|false|False|FALSE)$")
_TAGS_READ_AS_YAML_1_2 = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")


class RecipeYAMLError(ValueError):
    """A recipe file that cannot be read as plain data: the message names the file, the line and the limit."""


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with a nesting limit while composing and an error for duplicated mapping keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per nesting level: stop long before Python's recursion limit.
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise RecipeYAMLError(f"line {mark.line + 1}: nesting deeper than {MAX_DEPTH} levels; a recipe needs a few")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; explicit keys may override it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key (a list or mapping); let the constructor say so
                continue
            if first != key_node.start_mark.line + 1:
                raise RecipeYAMLError(f"key {_short(key)} appears twice, on lines {first} and "
                                      f"{key_node.start_mark.line + 1}; keep one")
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _TAGS_READ_AS_YAML_1_2]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _expanded_size(root: Node) -> int:
    """How many nodes the document has with every alias expanded, computed on the shared graph (so in time
    proportional to the file, not to the expansion); stops counting past the limit."""
    sizes: dict[int, int] = {}
    too_many = MAX_EXPANDED_NODES + 1

    def size(node: Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = too_many  # a node that contains itself (`&a [*a]`) expands without end
        if isinstance(node, ScalarNode):
            total = 1
        elif isinstance(node, SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        else:
            total = 1
        sizes[id(node)] = min(total, too_many)
        return sizes[id(node)]

    return size(root)


def load_recipe_yaml(path: Path):
    """The plain data (dicts, lists, strings, numbers, booleans, None) of a recipe file, or RecipeYAMLError."""
    if path.is_dir():
        raise RecipeYAMLError(f"{path} is a directory; give a recipe file (.yaml)")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeYAMLError(f"{path} is {size:,} bytes; a recipe may be at most {MAX_RECIPE_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeYAMLError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    return load_recipe_yaml_text(text, str(path))


def load_recipe_yaml_text(text: str, source: str = "recipe"):
    """As `load_recipe_yaml`, for text already read; `source` names it in errors."""
    loader = None
    try:
        loader = _RecipeLoader(text)  # its reader already refuses control characters
        root = loader.get_single_node()
        if root is None:
            return None
        if _expanded_size(root) > MAX_EXPANDED_NODES:
            raise RecipeYAMLError(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values; a recipe needs a "
                                  f"few hundred (do not nest aliases of aliases)")
        return loader.construct_document(root)
    except RecipeYAMLError as err:
        raise RecipeYAMLError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeYAMLError(f"{source} is not valid YAML: {_one_line(err)}") from None
    except RecursionError:
        raise RecipeYAMLError(f"{source}: nesting too deep to read; a recipe needs a few levels") from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())[:200]
