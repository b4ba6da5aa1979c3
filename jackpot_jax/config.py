"""Config validation: the one place a bad config key fails, naming the key, value and what is allowed.

Configs are ``ml_collections.ConfigDict`` files under ``configs/``, overridable from the command
line (``--config.key=value``). Each entry point lists its rules and calls :func:`validate` at
start-up, before any work is done.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A config key is missing or holds a value that is not allowed."""


Rule = tuple[Callable[[Any], bool], str]  # (is_allowed, description of what is allowed)


def validate(config: Mapping[str, Any], rules: Mapping[str, Rule], name: str = "config") -> None:
    """Check every ``rules[key]`` on ``config[key]``; raise :class:`ConfigError` on the first failure.

    Keys of ``config`` that no rule names are rejected too, so a typo cannot pass silently.
    """
    unknown = sorted(set(config.keys()) - set(rules))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]} is not a known key; known keys: {sorted(rules)}.")
    for key, (is_allowed, allowed) in rules.items():
        if key not in config:
            raise ConfigError(f"{name}.{key} is missing; it must be {allowed}.")
        value = config[key]
        try:
            ok = bool(is_allowed(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{name}.{key}={value!r} is not allowed: it must be {allowed}.")
