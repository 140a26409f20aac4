"""Tokenizers: text -> fixed-length int32 token ids.

`ByteTokenizer` needs no vocabulary file, so the embedded shapes dataset and
every test run offline. Vocabulary (vocab_size = 258):

    0          padding
    1          end of sequence (EOS)
    2 .. 257   the UTF-8 bytes 0..255, shifted by 2

There is no BOS token: causal text towers pool at EOS and bidirectional ones
mean-pool, neither needs one. EOS is always the last non-padding token, also
after truncation, so a text tower finds it as

    eos_index = (tokens != tokenizer.pad_id).sum(-1) - 1

which works for any id scheme (do not rely on `argmax(tokens)`: EOS is not the
largest id here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes + EOS, padded or truncated to `context_length` tokens."""

    pad_id = 0
    eos_id = 1
    bos_id = None  # see the module docstring
    _offset = 2  # byte b -> id b + 2
    vocab_size = 256 + _offset

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (one byte + EOS), got {context_length}")
        self.context_length = int(context_length)

    def __repr__(self) -> str:
        return f"ByteTokenizer(context_length={self.context_length})"

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of one text, EOS appended, not padded or truncated.

        Raises ValueError for empty / whitespace-only text and for bytes that
        are not UTF-8 (or a str that cannot be encoded, e.g. lone surrogates),
        so the loader can count and skip the record.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"text is not valid UTF-8: {text[:40]!r}") from e
        if not isinstance(text, str):
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty text")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text cannot be encoded as UTF-8: {text[:40]!r}") from e
        return [b + self._offset for b in data] + [self.eos_id]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids up to the first EOS (padding and EOS dropped)."""
        out = bytearray()
        for i in np.asarray(ids).tolist():
            if i == self.eos_id:
                break
            if i >= self._offset:
                out.append(i - self._offset)
        # A truncation may cut a multi-byte character; show it, do not fail.
        return out.decode("utf-8", errors="replace")

    def tokenize(self, text: str | bytes) -> np.ndarray:
        """(context_length,) int32: encode, truncate keeping EOS last, pad."""
        ids = self.encode(text)
        length = self.context_length
        if len(ids) > length:
            ids = ids[: length - 1] + [self.eos_id]
        out = np.full(length, self.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    def __call__(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """(N, context_length) int32 token ids of a list of texts."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("pass a list of texts; use tokenize() for a single text")
        out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            out[row] = self.tokenize(text)
        return out
