"""Text shipped with the package, for the main job (``hybrid-jax main``) and tests.

``tinyshakespeare.txt``: about 40,000 lines of plays by William Shakespeare (speeches as
"NAME:" then its lines, speeches separated by blank lines), 1,115,394 bytes of ASCII, 202,651
words. Shakespeare's plays are in the public domain; the selection is Andrej Karpathy's
"tiny shakespeare" data set, copied byte for byte, with no edits, from
github.com/karpathy/char-rnn, ``data/tinyshakespeare/input.txt`` at commit
6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e (the file last changed in 370cbcd4, 2015-05-21; that
repository is MIT licensed). sha256 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CORPUS = "tinyshakespeare"
CORPORA = ("tinyshakespeare",)
MAX_CORPUS_BYTES = 4 << 20  # what the package may ship: a few MB at most


def corpus_path(name: str = DEFAULT_CORPUS) -> Path:
    """The path of the shipped corpus ``name`` (a plain UTF-8 text file)."""
    if name not in CORPORA:
        raise ValueError(f"corpus {name!r}: not shipped; the corpora are {list(CORPORA)}")
    return Path(__file__).with_name(f"{name}.txt")


__all__ = ["CORPORA", "DEFAULT_CORPUS", "MAX_CORPUS_BYTES", "corpus_path"]
