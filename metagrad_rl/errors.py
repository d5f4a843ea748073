"""Errors for bad input: one clear line naming the bad value and what is accepted."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad value given by the user (configuration, arguments, batches, files).

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """
