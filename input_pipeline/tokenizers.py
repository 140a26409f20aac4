"""Tokenizers: text -> fixed-length int32 token ids.

Four kinds behind one interface (`make_tokenizer(kind, context_length, path)`):

    bytes          ByteTokenizer: UTF-8 bytes, no file needed (the real-data default)
    sentencepiece  SentencePieceTokenizer: a SentencePiece `.model` file
    hf             HFTokenizer: a Hugging Face `tokenizer.json` (the `tokenizers` library)
    shapes_bpe     HFTokenizer of the byte-level BPE shipped in this package
                   (shapes_bpe.json, 1,024 ids: 0 <pad>, 1 <eos>), trained on the embedded
                   shapes captions (`python -m input_pipeline.sources.shapes
                   --write_tokenizer PATH` rebuilds it); the shapes default

Every tokenizer has `context_length`, `vocab_size`, `pad_id`, `eos_id`,
`encode(text) -> list[int]` (EOS appended, not padded), `tokenize(text) -> (context_length,)
int32` and `__call__(texts) -> (N, context_length) int32`. The context length is a
config field and may be anything >= 2 (77 is only CLIP's choice).

Layout of the ids, the same for all three: the text's tokens, then EOS, then
padding. There is no BOS token: causal text towers pool at EOS and bidirectional
ones mean-pool, neither needs one. EOS is always the last non-padding token, also
after truncation, so a text tower finds it as

    eos_index = (tokens != tokenizer.pad_id).sum(-1) - 1

which works for any id scheme (do not rely on `argmax(tokens)`: EOS is not the
largest id in general). That needs a pad id that no text token and not EOS
uses; see each class for how it is chosen when the file has none.

ByteTokenizer vocabulary (vocab_size = 258):

    0          padding
    1          end of sequence (EOS)
    2 .. 257   the UTF-8 bytes 0..255, shifted by 2

Bad text (empty or whitespace-only, bytes that are not UTF-8, a str that cannot
be encoded) raises ValueError, so the loader can count and skip the record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

KINDS = ("bytes", "sentencepiece", "hf", "shapes_bpe")
# Shapes captions are 7-14 of its tokens (bytes: 36-72) and a long-caption sentence at most
# 24 (bytes: 132): a 3-6x shorter text tower, whose tokens are words, not letters.
SHAPES_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_bpe.json")


def as_text(text: str | bytes) -> str:
    """The text as a non-empty str; ValueError for anything a tokenizer should not see."""
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
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text cannot be encoded as UTF-8: {text[:40]!r}") from e
    return text


def pad_or_truncate(
    ids: Sequence[int], context_length: int, pad_id: int, eos_id: int
) -> np.ndarray:
    """(context_length,) int32: ids (ending in EOS) truncated keeping EOS last, then padded."""
    ids = list(ids)
    if len(ids) > context_length:
        ids = ids[: context_length - 1] + [eos_id]
    out = np.full(context_length, pad_id, np.int32)
    out[: len(ids)] = ids
    return out


def _check_context_length(context_length: int) -> int:
    if int(context_length) < 2:
        raise ValueError(f"context_length must be >= 2 (one token + EOS), got {context_length}")
    return int(context_length)


class _FixedLength:
    """`tokenize` and `__call__` from a subclass's `encode` (ids + EOS)."""

    context_length: int
    pad_id: int
    eos_id: int

    def encode(self, text: str | bytes) -> list[int]:
        raise NotImplementedError

    def tokenize(self, text: str | bytes) -> np.ndarray:
        """(context_length,) int32: encode, truncate keeping EOS last, pad."""
        return pad_or_truncate(self.encode(text), self.context_length, self.pad_id, self.eos_id)

    def __call__(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """(N, context_length) int32 token ids of a list of texts."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("pass a list of texts; use tokenize() for a single text")
        out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            out[row] = self.tokenize(text)
        return out

    def _until_eos(self, ids) -> list[int]:
        ids = np.asarray(ids).tolist()
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return [i for i in ids if i != self.pad_id]


class ByteTokenizer(_FixedLength):
    """UTF-8 bytes + EOS, padded or truncated to `context_length` tokens."""

    pad_id = 0
    eos_id = 1
    bos_id = None  # see the module docstring
    _offset = 2  # byte b -> id b + 2
    vocab_size = 256 + _offset

    def __init__(self, context_length: int):
        self.context_length = _check_context_length(context_length)

    def __repr__(self) -> str:
        return f"ByteTokenizer(context_length={self.context_length})"

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of one text, EOS appended, not padded or truncated.

        Raises ValueError for empty / whitespace-only text and for bytes that
        are not UTF-8 (or a str that cannot be encoded, e.g. lone surrogates),
        so the loader can count and skip the record.
        """
        data = as_text(text).encode("utf-8")
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


def _check_file(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path!r}")
    return path


def _choose_pad(file_pad: int | None, eos_id: int, vocab_size: int) -> tuple[int, int]:
    """(pad_id, vocab_size): the file's pad token, or one extra id after the vocabulary.

    A pad equal to EOS (CLIP's HF files) cannot be used: the EOS lookup counts
    non-pad tokens.
    """
    if file_pad is not None and 0 <= file_pad < vocab_size and file_pad != eos_id:
        return file_pad, vocab_size
    return vocab_size, vocab_size + 1


class SentencePieceTokenizer(_FixedLength):
    """A SentencePiece `.model` file: its pieces, then its EOS piece, then padding.

    EOS is the model's `eos_id()` (SentencePiece's default `</s>`, id 2); a model
    trained with `--eos_id=-1` is refused. Padding is the model's `pad_id()` when
    it has one (T5-style models: 0); SentencePiece trains without one by default
    (`pad_id() == -1`), and then pad_id = the model's piece count, one id past the
    vocabulary, and `vocab_size` is one more than the piece count (the text
    tower's embedding table gets a row for it). BOS is never added.
    """

    def __init__(self, path: str, context_length: int):
        import sentencepiece

        self.path = _check_file(path, "SentencePiece model file")
        self.context_length = _check_context_length(context_length)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"cannot load SentencePiece model {self.path!r}: {first_line}"
            ) from None
        pieces = self._sp.get_piece_size()
        self.eos_id = int(self._sp.eos_id())
        if not 0 <= self.eos_id < pieces:
            raise ValueError(
                f"SentencePiece model {self.path!r} has no EOS piece (eos_id={self.eos_id}); "
                "train it with an EOS id (SentencePiece's default --eos_id=2)"
            )
        file_pad = int(self._sp.pad_id())
        self.pad_id, self.vocab_size = _choose_pad(
            file_pad if file_pad >= 0 else None, self.eos_id, pieces
        )

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, context_length={self.context_length})"

    def encode(self, text: str | bytes) -> list[int]:
        """The model's ids of one text, EOS appended; ValueError if it has none."""
        text = as_text(text)
        ids = self._sp.encode(text, out_type=int)
        if not ids:
            raise ValueError(f"text has no tokens: {text[:40]!r}")
        return list(ids) + [self.eos_id]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids up to the first EOS (padding dropped)."""
        return self._sp.decode([i for i in self._until_eos(ids) if i < self._sp.get_piece_size()])


# Tried in order when no EOS token is named: T5/SentencePiece-style, GPT-2/CLIP, BERT, others.
HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "[SEP]", "<eos>", "<|eos|>", "<|end_of_text|>")
HF_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")


class HFTokenizer(_FixedLength):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library).

    Texts are encoded without the file's special tokens (`add_special_tokens=False`:
    no BERT [CLS]/[SEP], no CLIP <|startoftext|>), then EOS is appended, as for
    every tokenizer here. Special tokens written in the text itself are encoded as
    plain text. The file's own truncation and padding settings are switched off;
    `context_length` governs.

    EOS: `eos_token` if given, else the first of HF_EOS_TOKENS in the
    vocabulary; a file with none of them is refused. Padding: `pad_token` if
    given, else the file's padding token, else the first of HF_PAD_TOKENS in the
    vocabulary; if none (or it is the EOS token, as in CLIP's files), pad_id =
    one id past the vocabulary and `vocab_size` is one larger.
    """

    def __init__(
        self,
        path: str,
        context_length: int,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        import tokenizers

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.path = _check_file(path, "Hugging Face tokenizer file")
        self.context_length = _check_context_length(context_length)
        try:
            tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception on parse errors
            raise ValueError(
                f"cannot load Hugging Face tokenizer {self.path!r}: {str(e).splitlines()[0]}"
            ) from None
        file_pad = tok.padding["pad_id"] if tok.padding else None
        tok.no_truncation()
        tok.no_padding()
        # A caption that literally contains "</s>" or "<pad>" must not produce the EOS
        # or pad id mid-text (the EOS lookup would break): encode special tokens as text.
        tok.encode_special_tokens = True
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1

        if eos_token is None:
            eos_token = next((t for t in HF_EOS_TOKENS if t in vocab), None)
            if eos_token is None:
                raise ValueError(
                    f"Hugging Face tokenizer {self.path!r} has no EOS token; looked for "
                    f"{', '.join(HF_EOS_TOKENS)} (name one with eos_token=)"
                )
        elif eos_token not in vocab:
            raise ValueError(f"Hugging Face tokenizer {self.path!r} has no token {eos_token!r}")
        self.eos_token, self.eos_id = eos_token, vocab[eos_token]

        if pad_token is not None:
            if pad_token not in vocab:
                raise ValueError(f"Hugging Face tokenizer {self.path!r} has no token {pad_token!r}")
            file_pad = vocab[pad_token]
        elif file_pad is None:
            file_pad = next((vocab[t] for t in HF_PAD_TOKENS if t in vocab), None)
        self.pad_id, self.vocab_size = _choose_pad(file_pad, self.eos_id, size)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, context_length={self.context_length})"

    def __setstate__(self, state) -> None:
        # Worker processes get the tokenizer pickled; the library's pickle drops this flag.
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    def encode(self, text: str | bytes) -> list[int]:
        """The file's ids of one text (no special tokens), EOS appended."""
        text = as_text(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"text has no tokens: {text[:40]!r}")
        return list(ids) + [self.eos_id]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids up to the first EOS (padding dropped)."""
        return self._tok.decode(self._until_eos(ids))


def make_tokenizer(kind: str, context_length: int, path: str = ""):
    """The tokenizer of config `input.tokenizer` (kind) and `input.tokenizer_path` (path)."""
    if kind == "bytes":
        if path:
            raise ValueError(f"the 'bytes' tokenizer reads no file, got tokenizer path {path!r}")
        return ByteTokenizer(context_length)
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "shapes_bpe":
        if path:
            raise ValueError(f"the 'shapes_bpe' tokenizer is built in, got tokenizer path {path!r}")
        return HFTokenizer(SHAPES_BPE_PATH, context_length)
    if not path:
        what = "a SentencePiece .model file" if kind == "sentencepiece" else "a tokenizer.json"
        raise ValueError(f"the {kind!r} tokenizer needs a path to {what}")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, context_length)
    return HFTokenizer(path, context_length)
