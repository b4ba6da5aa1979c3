"""Objects named by import path (``"package.module:attribute"``), for registries that let users
plug in their own code by name."""
from __future__ import annotations

import importlib


def import_object(path: str, what: str):
    """The object at ``"package.module:attr[.attr...]"``; ``ValueError`` naming ``what`` (e.g.
    "reward") and ``path`` when the module or an attribute is missing."""
    module_name, _, attr_path = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import the module {module_name!r}, so the {what} {path!r} could not be imported: "
                         f"{err}") from err
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"The {what} {path!r} could not be imported: {obj!r} has no attribute {attr!r}.")
        obj = getattr(obj, attr)
    return obj
