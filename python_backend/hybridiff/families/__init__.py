"""Model families the server can host, by name."""

from __future__ import annotations

from .base import Family


def get_family(name: str) -> Family:
    """The family named in a model's config; imported lazily so one family's deps stay optional."""
    if name == "sdxl":
        from .sdxl import SDXLFamily

        return SDXLFamily()
    if name == "sd3":
        from .sd3 import SD3Family

        return SD3Family()
    raise ValueError(f"unknown model family {name!r}; known: sdxl, sd3")
