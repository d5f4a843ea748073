"""Errors for bad input: one clear line naming the bad value and what is accepted."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad value given by the user (configuration, arguments, batches, files).

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """


class DivergenceError(ArithmeticError):
    """Training or an unroll produced non-finite numbers from finite input (not a bad value).

    The message says where (iteration, round, inner step) and what to change; the CLI prints
    it on one line and exits with code 2, like a :class:`ConfigError`.
    """
