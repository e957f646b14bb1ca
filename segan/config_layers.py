"""Config resolution in layers, and where every value came from.

Order (later wins): the dataclass defaults (``default``), the method's family
(``method``: :attr:`segan.methods.Method.family`), the YAML file (``file``), the ``--set``
overrides (``--set``). A value the method cannot work with (a PatchGAN objective on the
SegAN critic, a clamp on a WGAN-GP critic, ...) exits 2 naming both keys. ``segan
describe`` prints the result with its sources; training saves it as ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segan.config import Config, MethodConfig, apply_overrides, flatten, from_dict, parse_override, read_yaml, to_dict
from segan.errors import UserError

SOURCES = ("default", "method", "file", "--set")


@dataclass
class Resolved:
    """A validated config and, per flat dotted key, the layer its value came from."""

    config: Config
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "regions":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _method_name(*layers: dict) -> str:
    for raw in reversed(layers):
        section = raw.get("method")
        if isinstance(section, dict) and "name" in section:
            return str(section["name"])
    return MethodConfig().name


def _override_keys(overrides: list[str]) -> list[str]:
    keys = []
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        keys += [f"{key}.{k}" for k in flatten(value)] if isinstance(value, dict) and path[-1] != "regions" else [key]
    return keys


def resolve_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                   method: str | None = None) -> Resolved:
    """Resolve ``path`` (YAML; None = defaults only) and ``--set`` ``overrides``.

    ``method`` (``segan sweep``) trains another method than the file's: the file's values
    for keys some method owns are then dropped, so the new method brings its own.
    """
    from segan.methods import METHODS, family_keys

    overrides = list(overrides)
    file_raw = read_yaml(path) if path else {}
    file_flat = flatten(file_raw)
    name = method or _method_name(file_raw, apply_overrides({}, list(overrides)))
    if method and method != _method_name(file_raw):
        owned = family_keys()
        file_flat = {k: v for k, v in file_flat.items() if k not in owned}
        file_raw = _unflatten(file_flat)
        overrides.insert(0, f"method.name={method}")
    family = METHODS[name].family if name in METHODS else None  # an unknown name fails validation below
    family_flat = dict(family.settings) if family else {}
    raw = apply_overrides(_merge(_unflatten(family_flat), file_raw), overrides)
    cfg = from_dict(raw)
    sources = {key: "method" for key in family_flat}
    sources.update({key: "file" for key in file_flat})
    sources.update({key: "--set" for key in _override_keys(overrides)})
    if family:
        values = flatten(to_dict(cfg))
        for key, value, why in family.conflicts(values):
            allowed = ", ".join("null" if v is None else str(v) for v in family.allowed[key][0])
            raise UserError(
                f"config keys 'method.name' ({name}, from {sources.get('method.name', 'default')}) and '{key}' "
                f"({'null' if value is None else value}, from {sources.get(key, 'default')}) do not fit: {why}; "
                f"leave {key} to the method (drop it from the file or --set) or set it to one of: {allowed}")
    return Resolved(cfg, sources)


def format_resolved(resolved: Resolved) -> str:
    """Every key of the resolved config as YAML, each non-default value marked with its source."""
    lines = []
    for section, values in to_dict(resolved.config).items():
        if not isinstance(values, dict):
            lines.append(_line(section, values, resolved.source(section), 0))
            continue
        lines.append(f"{section}:")
        for key, value in flatten(values).items():
            lines.append(_line(key, value, resolved.source(f"{section}.{key}"), 2))
    return "\n".join(lines)


def _line(key: str, value: Any, source: str, indent: int) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")
    body = f"{' ' * indent}{key}: {text}"
    return body if source == "default" else f"{body:<52} # {source}"
