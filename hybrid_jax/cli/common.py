"""What the ``hybrid-jax`` commands share: their error types, the one-line error report, and
YAML reading.

Every command reports bad input as one ``error: ...`` line on stderr naming the culprit (the
file, the flag, or ``section.key``) and exits 2, without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Any


class ConfigError(ValueError):
    """A bad run configuration; the message names the section and key, or the file."""


class CommandError(Exception):
    """Bad input to a command: printed as one ``error:`` line, exit 2."""


class UsageError(Exception):
    """A bad combination of options: reported as argparse reports a bad option (the usage,
    then the message) and exit 2."""


def error(message: str) -> int:
    """Print ``error: message`` on stderr; the exit code of bad input, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


# YAML 1.2's float syntax: an exponent without a dot (3e-4), which PyYAML (YAML 1.1) reads as
# a string.
_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def yaml_load(text: str) -> Any:
    """yaml.safe_load, except that 3e-4 is a float (YAML 1.2), not PyYAML's string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


__all__ = ["CommandError", "ConfigError", "UsageError", "error", "yaml_load"]
