"""The one way wattkd reads YAML a user wrote: duplicate keys are refused, with both lines.

PyYAML keeps the last of two equal keys without a word, so a second `train:` section (or a
`lr:` typed twice) silently replaces the first. Here the document is composed into nodes
first, every mapping is checked for repeated keys (`<<` merge keys excepted: overriding a
merged key is what merging is for), and only then constructed with the safe constructors.
`check_duplicate_keys` runs the same check on YAML read by another library (lm-eval task
files, whose `!function` tags only lm-eval can construct).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from wattkd.errors import ConfigError

__all__ = ["check_duplicate_keys", "load_yaml"]

_MERGE = "tag:yaml.org,2002:merge"


def load_yaml(text: str, source: str) -> Any:
    """Parse `text` (from `source`, named in errors) with safe types; ConfigError for invalid
    YAML or a key given twice in one mapping."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def check_duplicate_keys(text: str, source: str) -> None:
    """The duplicate-key check alone (tags are not constructed, so any tag is accepted)."""
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if node is not None:
                _refuse_duplicates(node, source)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def _refuse_duplicates(node: Node, source: str) -> None:
    found = list(_duplicates(node, (), set()))
    if not found:
        return
    where = "; ".join(f"{key!r} at lines {first} and {second}" for key, first, second in found)
    raise ConfigError(f"{source}: key given twice: {where} (YAML would keep only the last one "
                      "and silently drop the other); merge them into one")


def _duplicates(node: Node, path: tuple[str, ...], seen_nodes: set[int]
                ) -> Iterator[tuple[str, int, int]]:
    """(dotted key, first line, repeated line) for every key given twice in a mapping."""
    if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive one)
        return
    seen_nodes.add(id(node))
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicates(item, (*path, str(i)), seen_nodes)
    elif isinstance(node, MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, ScalarNode) else "<complex key>"
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE:
                ident = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if ident in first:
                    yield ".".join((*path, name)), first[ident], line
                else:
                    first[ident] = line
            yield from _duplicates(value_node, (*path, str(name)), seen_nodes)
