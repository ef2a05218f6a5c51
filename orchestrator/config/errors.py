"""The one error a user's input can raise before anything starts.

`ConfigError(key, message)` reads `<key>: <what is wrong, what is allowed>`; the CLI prints it as
`error: ...` on one line and exits with status 2. `key` is a dotted config key (`lora.r`) or, for
a file that cannot be used, the key that named it (`data.path`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, a missing or malformed file, or an unreachable service."""

    def __init__(self, key: str, message: str) -> None:
        # One line, whatever the message quotes (a Hydra or a parser error may span several).
        self.key = key
        self.message = " ".join(str(message).split())
        super().__init__(f"{key}: {self.message}")
