"""YAML as configs, flags and params are read: PyYAML's safe loader with the YAML 1.2 core schema's scalars.

PyYAML implements YAML 1.1, where `--seed 010` is octal 8, `1:30` is 90 (base 60), `yes`/`off` are booleans and `1e-3`
is a string (a float needs a dot). In 1.2 (what a reader expects today) those are 10, a string, strings and 0.001.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

BOOL, INT, FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class CoreLoader(yaml.SafeLoader):
    """SafeLoader with 1.2 core-schema booleans, integers (decimal only) and floats; everything else as before."""


CoreLoader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (BOOL, INT, FLOAT)]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
CoreLoader.add_implicit_resolver(BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
CoreLoader.add_implicit_resolver(INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
CoreLoader.add_implicit_resolver(FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))
CoreLoader.add_constructor(INT, lambda loader, node: int(loader.construct_scalar(node), 10))  # 010 is ten


def load_yaml(text: str) -> Any:
    """text as YAML 1.2 core-schema values (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=CoreLoader)  # noqa: S506  (a SafeLoader subclass)


def dump_yaml(value: Any) -> str:
    """value as one line of YAML that load_yaml reads back to the same value (how config values are stored as params)."""
    text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    if isinstance(value, str) and load_yaml(text) != value:  # PyYAML leaves '1e3', '08' plain (1.1 strings): 1.2 numbers
        text = yaml.safe_dump(value, default_style='"').removesuffix("\n...\n").strip()
    return text
