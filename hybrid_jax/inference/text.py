"""Text <-> token ids for ``hybrid-jax generate``: a Hugging Face ``tokenizer.json``, or raw bytes.

    codec = load_codec("path/to/tokenizer.json")   # or load_codec(None): UTF-8 bytes
    ids = codec.encode("Hello")                     # list[int]
    stream = codec.stream()
    for token in new_tokens:
        print(stream.push([token]), end="", flush=True)   # only the text that is new
    print(stream.flush())

``TokenizerCodec`` wraps a ``tokenizers.Tokenizer`` (``Tokenizer.from_file``); its stream decodes
the tokens since the last returned text (and the few before them, for context) and returns what
is new, holding back while the text ends in U+FFFD (a multi-byte character split across tokens).
``ByteCodec`` maps each UTF-8 byte to the token id of its value (ids >= 256 are not bytes and
decode to nothing); its stream is an incremental UTF-8 decoder, so a character split across
tokens comes out whole. Invalid UTF-8 decodes to U+FFFD in both, and a stream's output joined up
equals ``decode`` of the same ids.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
_REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model; the message names it."""


class TextStream:
    """Incremental decoding: ``push(ids)`` returns the new text, ``flush()`` whatever was held."""

    def push(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        raise NotImplementedError


class TextCodec:
    """encode(str) -> ids, decode(ids) -> str, and a ``stream()`` decoder for streaming."""

    description = ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def stream(self) -> TextStream:
        raise NotImplementedError

    def byte_length(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes of the text ``ids`` stand for (the denominator of bits per byte);
        special tokens stand for none."""
        return len(self.decode(ids).encode("utf-8"))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise TokenizerError if a model with ``vocab_size`` tokens cannot use this codec."""


# ----------------------------------------------------------------------------- tokenizer.json
class _SuffixStream(TextStream):
    """Decodes a short window of recent tokens, not everything so far, so each push costs O(1).

    ``prefix`` .. ``read`` are tokens whose text was already returned; the text of
    ``ids[prefix:]`` minus that of ``ids[prefix:read]`` is new. Decoding from a few tokens back,
    rather than from ``read``, keeps tokenizers whose text for a token depends on the one
    before it (leading-space markers, byte fallback) right.
    """

    def __init__(self, decode: Any) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _new_text(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or (not final and text.endswith(_REPLACEMENT)):
            return ""  # nothing yet, or maybe half a character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(int(i) for i in ids)
        return self._new_text(final=False)

    def flush(self) -> str:
        return self._new_text(final=True)


class TokenizerCodec(TextCodec):
    """A Hugging Face ``tokenizers.Tokenizer``. ``encode`` adds the tokenizer's special tokens
    (as transformers does by default); ``decode`` skips special tokens."""

    def __init__(self, tokenizer: Any, source: str | Path = "") -> None:
        self.tokenizer = tokenizer
        self.description = f"{source} ({tokenizer.get_vocab_size()} tokens)"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def stream(self) -> TextStream:
        return _SuffixStream(self.decode)


# ----------------------------------------------------------------------------- bytes
class _ByteStream(TextStream):
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(_bytes(ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _bytes(ids: Sequence[int]) -> bytes:
    return bytes(i for i in (int(i) for i in ids) if 0 <= i < 256)


class ByteCodec(TextCodec):
    """Raw UTF-8: token id = byte value. Needs a vocabulary of at least 256."""

    description = "UTF-8 bytes (token id = byte value)"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return _bytes(ids).decode("utf-8", errors="replace")

    def byte_length(self, ids: Sequence[int]) -> int:
        return len(_bytes(ids))  # exact, even for a piece that cuts a character

    def stream(self) -> TextStream:
        return _ByteStream()

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise TokenizerError(f"no tokenizer given and the model's vocabulary has {vocab_size} "
                                 f"tokens, fewer than the 256 that raw UTF-8 bytes need; pass "
                                 f"--tokenizer path/to/{TOKENIZER_FILE}")


# ----------------------------------------------------------------------------- choice
def load_tokenizer(path: str | Path) -> TokenizerCodec:
    """A ``tokenizer.json`` file as a codec; TokenizerError naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise TokenizerError(f"{path}: reading it needs the `tokenizers` package ({e}); "
                             f"pip install tokenizers") from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({first})") from None
    return TokenizerCodec(tokenizer, path)


def load_codec(tokenizer: str | Path | None = None, checkpoint_dir: str | Path | None = None
               ) -> TextCodec:
    """``tokenizer`` if given, else ``checkpoint_dir/tokenizer.json`` if present, else bytes."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / TOKENIZER_FILE).is_file():
        return load_tokenizer(Path(checkpoint_dir) / TOKENIZER_FILE)
    return ByteCodec()


__all__ = ["ByteCodec", "TextCodec", "TextStream", "TokenizerCodec", "TokenizerError",
           "load_codec", "load_tokenizer"]
