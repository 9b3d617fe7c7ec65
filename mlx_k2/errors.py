"""The project's error types: every user-facing failure is one of these, with a one-line message.

The CLI turns them into a single line on stderr and a non-zero exit; it never shows a traceback for them.
Anything else escaping the library is a bug.
"""


class K2Error(Exception):
    """Base of all errors caused by input the user gave (files, options, data)."""

    exit_code = 2


class ConfigError(K2Error):
    """config.json is missing, malformed, or describes something unsupported."""


class CheckpointError(K2Error):
    """A shard, the index or a safetensors header is missing, damaged or inconsistent."""


class UsageError(K2Error):
    """An option value that cannot be run (token id out of range, unknown device, ...)."""
