"""Errors a user can fix by changing a setting.

They carry the config key, the offending value and what is allowed, so the CLI can print them as one
line and exit before any work is done.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class StorageError(OSError):
    """Writing a run file failed (a full disk, a quota, a vanished mount); nothing was replaced."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()
