"""What every stage's frozen config dataclass shares: validation of its `Literal` fields and the
tolerant `from_dict` (keys a newer version wrote are ignored)."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal, get_args, get_origin, get_type_hints


def check_choices(config) -> None:
    """Every field of a config dataclass typed `Literal[...]` holds one of its values, else a
    ValueError naming the field, the choices and the value."""
    for name, hint in get_type_hints(type(config)).items():
        allowed = get_args(hint) if get_origin(hint) is Literal else ()
        if allowed and getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(a for a in allowed if a)}, "
                             f"not {getattr(config, name)!r}")


def from_known_fields(cls, d: dict):
    """`cls(**d)` keeping only the keys that are fields of `cls`."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
