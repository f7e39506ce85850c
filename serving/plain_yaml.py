"""Plain YAML for the files people write by hand (experiment configs, rules files).

A ``yaml.SafeLoader`` (no arbitrary objects) that also refuses anchors / aliases, so that a
few hundred bytes can never expand into gigabytes (the "billion laughs" alias bomb), and
repeated keys, where a later value would silently replace an earlier one. PyYAML is imported
when a file is read, not with ``serving``; it is in the base install (``pyyaml>=6.0``).
Shared by ``training.config`` and ``serving.rules`` (serving never imports training).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

_MAX_SHOWN = 120  # characters of a key quoted in a message


def load_plain_yaml(text: str, what: str = "file") -> Any:
    """Parse ``text``; ``yaml.YAMLError`` (with the line) for anchors, aliases or a repeated
    key. ``what`` names the kind of file in the message (``"config"``, ``"rules file"``)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.YAMLError(
                    f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, "
                    f"*name) are not allowed in a {what}; write the values out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, Hashable) and key in seen:
                    shown = repr(key)
                    if len(shown) > _MAX_SHOWN:
                        shown = f"{shown[:_MAX_SHOWN]}... ({len(shown):,} chars)"
                    raise yaml.YAMLError(
                        f"line {key_node.start_mark.line + 1}: key {shown} is repeated; "
                        "a later value would silently replace the earlier one"
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # a SafeLoader: no arbitrary objects
