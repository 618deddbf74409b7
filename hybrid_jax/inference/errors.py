"""The errors ``generate`` and its sampling options raise for bad arguments.

They subclass ValueError (and TypeError for a wrong type), so ordinary handlers still work, while
a caller such as the CLI can tell a user's bad input from a failure inside the library.
"""

from __future__ import annotations


class InputError(ValueError):
    """An argument of ``generate`` (or ``SamplingConfig``) is invalid; the message names it."""


class InputTypeError(InputError, TypeError):
    """An argument of ``generate`` has the wrong type; the message names it."""
