"""Captions: sentence splitting, sub-caption sampling (DreamLIP), caption-field choice.

DreamLIP (arXiv 2403.17007) treats every sentence of a long, generated caption as
a sub-caption of the image: K of them are sampled per example per epoch and
become extra positives (`texts`, (K, L) per record, (B, K, L) per batch).
Quality-caption training (arXiv 2405.08911) picks, per example per epoch, one of
several caption fields (raw alt-text, rewritten captions) with configured
probabilities.

Both draw random numbers per record, so both are `transforms.RandomTransform`s:
the loader hands them a numpy Generator that is a pure function of (loader seed,
epoch, source index, transform), never of the process count, the thread that
built the batch or what was read before. A resumed or elastically restored run
therefore samples exactly the sub-captions the uninterrupted run would have, and
each epoch samples new ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from input_pipeline import transforms

# ----------------------------------------------------------------------------
# Sentence splitting.
#
# Rule based, not a model (nltk punkt, spaCy): generated captions are clean,
# regular prose, a rule splitter is deterministic, dependency-free and ~10 us per
# caption, and its failure cases are listed here rather than learnt. A sentence
# ends at `.`, `!`, `?`, `...` or `…` (plus any closing quotes or brackets) that
# is followed by whitespace and then by something that is not a lowercase
# letter, unless the word before a single `.` is an abbreviation. Decimals
# ("3.5 cm"), "e.g.," and URLs never split because no whitespace follows their
# dots. A newline ends a sentence too (captions use lines for paragraphs and
# bullets), except a soft line wrap: a line that does not end in terminal
# punctuation followed by one that starts in lowercase is the same sentence.
#
# Known limits: a sentence that really ends in an abbreviation or a capital
# initial ("... made by Dr. Smith and Co. Then ...", "... plan B. Then ...") is
# not split there; a dotted initialism before a capitalised word is split ("The
# U.S. | Army"); a sentence that starts in lowercase is glued to the previous
# one; missing spaces ("red.The") are not split.

# Abbreviations (lowercase, without the final dot) after which a `.` never ends
# a sentence: titles and Latin / measuring abbreviations that always go on.
# "etc", "Inc.", "al." are left out on purpose: they often end a sentence, and
# the next-word rule already keeps "etc. and" together.
_ABBREVIATIONS = frozenset(
    {
        'mr',
        'mrs',
        'ms',
        'dr',
        'prof',
        'sr',
        'jr',
        'st',
        'mt',
        'ft',
        'rev',
        'gen',
        'col',
        'lt',
        'capt',
        'sgt',
        'gov',
        'sen',
        'rep',
        'hon',
        'pres',
        'e.g',
        'i.e',
        'cf',
        'vs',
        'viz',
        'approx',
        'ca',
        'incl',
        'esp',
        'resp',
        'dept',
        'univ',
        'ave',
        'blvd',
    }
)
# Abbreviations that are one only before a number ("No. 5", "Fig. 3"); "No. It is
# blue." still splits.
_NUMBER_ABBREVIATIONS = frozenset({'no', 'nos', 'fig', 'figs', 'vol', 'p', 'pp', 'eq', 'sec', 'ch'})

# A terminator: an ellipsis or a run of .!? , then closing quotes / brackets, then
# whitespace or the end of the line (so "3.5", "e.g.," and "a.com" never match).
_TERMINATOR = re.compile(r'(?:\.\.\.+|…|[.!?]+)[\'"”’»)\]]*(?=\s|$)')
# List markers at the start of a line: "- ", "* ", "• ", "1. ", "2) ", "(a) ", "a) ".
_BULLET = re.compile(r'^\s*(?:[-*•·–—]+|\d{1,3}[.)]|\(?[A-Za-z0-9]\))\s+')
_OPENING = '\'"“‘«(['
_LINE_END_PUNCT = ('.', '!', '?', '…', ':', ';', '"', '”', '’', ')', ']')


def _is_boundary(line: str, match: re.Match) -> bool:
    rest = line[match.end() :].lstrip()
    if not rest:
        return True  # end of line
    if rest[0].islower():
        return False  # "... so on... and then", "etc. and"
    punct = match.group(0).rstrip('\'"”’»)]')
    if punct != '.':
        return True  # "!", "?", "?!", ellipses
    words = line[: match.start()].split()
    if not words:
        return True
    word = words[-1].lstrip(_OPENING)
    if len(word) == 1 and word.isupper():
        return False  # an initial: "J. R. R. Tolkien", "A. Smith"
    lower = word.lower()
    if lower in _ABBREVIATIONS:
        return False
    if lower in _NUMBER_ABBREVIATIONS and rest[0].isdigit():
        return False
    return True


def _lines(text: str) -> list[str]:
    """Logical lines: bullets stripped, soft-wrapped lines joined."""
    lines: list[str] = []
    for raw in text.splitlines():
        bullet = _BULLET.match(raw)
        line = raw[bullet.end() :] if bullet else raw
        line = ' '.join(line.split())  # collapse tabs and runs of spaces
        if not line:
            lines.append('')  # a blank line ends a paragraph
            continue
        soft_wrap = (
            not bullet
            and lines
            and lines[-1]
            and line[0].islower()
            and not lines[-1].endswith(_LINE_END_PUNCT)
        )
        if soft_wrap:
            lines[-1] = f'{lines[-1]} {line}'
        else:
            lines.append(line)
    return lines


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace-normalised, in order; see the rules above.

    Pieces with no letter or digit (a lone "-", "...") are dropped, so every
    sentence returned can be tokenized. Deterministic: a pure function of `text`.
    """
    sentences = []
    for line in _lines(text):
        start = 0
        for match in _TERMINATOR.finditer(line):
            if _is_boundary(line, match):
                sentences.append(line[start : match.end()].strip())
                start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if any(c.isalnum() for c in s)]


# ----------------------------------------------------------------------------
# Sub-caption sampling.

FILL_MODES = ('replace', 'pad')


def sample_subcaption_indices(
    num_sentences: int, k: int, rng: np.random.Generator, fill: str = 'replace'
) -> tuple[np.ndarray, np.ndarray]:
    """(k,) int sentence indices (-1 = padding) and (k,) bool validity.

    - n >= k: k distinct sentences (without replacement), in random order.
    - 0 < n < k, fill='replace': every sentence once, plus k - n drawn with
      replacement, shuffled (DreamLIP's "with replacement when there are fewer
      than K"; taking each sentence once first keeps all of the caption's
      content in every epoch instead of leaving it to chance). All valid.
    - 0 < n < k, fill='pad': the n sentences in random order, then k - n
      padding slots (index -1, invalid).
    - n == 0: k padding slots in either mode (nothing to replace with).
    """
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    if num_sentences >= k:
        index = rng.choice(num_sentences, size=k, replace=False)
    elif num_sentences > 0 and fill == 'replace':
        extra = rng.integers(num_sentences, size=k - num_sentences)
        index = rng.permutation(np.concatenate([np.arange(num_sentences), extra]))
    else:
        index = np.concatenate([rng.permutation(num_sentences), np.full(k - num_sentences, -1)])
    index = index.astype(np.int64)
    return index, index >= 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleSubcaptions(transforms.RandomTransform):
    """record[out_key] = (k, L) int32 token ids of k sentences of record[field];
    record[valid_key] = (k,) bool, False for padding rows.

    Padding rows hold a lone EOS (then pad ids), not all pad ids, so a text
    tower pooling at EOS or averaging over non-pad tokens stays finite on them
    (no 0/0 -> NaN that a mask would multiply but not remove from gradients);
    losses must still drop them with `valid_key`.
    """

    tokenizer: transforms.TextTokenizer  # its context length is L
    k: int = 6
    field: str = 'long_caption'
    out_key: str = 'texts'
    valid_key: str = 'texts_valid'
    fill: str = 'replace'

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f'SampleSubcaptions: k must be >= 1, got {self.k}')
        if self.fill not in FILL_MODES:
            raise ValueError(
                f"SampleSubcaptions: fill must be one of {FILL_MODES}, got {self.fill!r}"
            )

    def __call__(self, record, rng):
        try:
            text = record[self.field]
        except KeyError:
            raise KeyError(
                f'SampleSubcaptions: no field {self.field!r}; ' f'record has {sorted(record)}'
            ) from None
        if isinstance(text, bytes):
            try:
                text = text.decode('utf-8')
            except UnicodeDecodeError as e:  # a bad record: the loader skips it
                raise ValueError(f'SampleSubcaptions({self.field!r}): not UTF-8') from e
        sentences = split_sentences(text)
        index, valid = sample_subcaption_indices(len(sentences), self.k, rng, self.fill)
        length = self.tokenizer.context_length
        ids = np.full((self.k, length), self.tokenizer.pad_id, np.int32)
        ids[:, 0] = self.tokenizer.eos_id  # padding rows: a lone EOS (see class doc)
        tokens = {}  # each distinct sentence once: with replacement, rows repeat
        for row, i in enumerate(index.tolist()):
            if i >= 0:
                if i not in tokens:
                    tokens[i] = self.tokenizer.tokenize(sentences[i])
                ids[row] = tokens[i]
        return {**record, self.out_key: ids, self.valid_key: valid}


# ----------------------------------------------------------------------------
# Packing an image's texts into one row.

PACKED_FIELDS = ('packed_tokens', 'packed_segments', 'packed_positions', 'packed_ends')


@dataclasses.dataclass(frozen=True)
class PackTexts:
    """record['text'] (L,) and the valid rows of record['texts'] (K, L'), each padded with
    `pad_id` at the end, -> their real tokens back to back in one row of `length`:

    packed_tokens (length,): the tokens, then pad_id;
    packed_segments (length,): j + 1 on text j's tokens (0: the caption), 0 on padding;
    packed_positions (length,): each token's position inside its own text;
    packed_ends (1 + K,): where text j's last token (its EOS) sits; 0 for one not packed.

    A causal text tower that attends within segments then gives every text the features it
    gives it alone (ImageTextModel.encode_packed_texts), at the cost of the real tokens
    only: on shapes 52% of the padded ones. A sentence that no longer fits is dropped,
    marked False in texts_valid (the losses skip it); the caption always fits.
    """

    length: int
    pad_id: int = 0

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f'PackTexts: length must be >= 1, got {self.length}')

    def __call__(self, record):
        texts = [record['text'], *record['texts']]
        valid = np.array([True, *record['texts_valid']])
        tokens = np.full(self.length, self.pad_id, np.int32)
        segments = np.zeros(self.length, np.int32)
        positions = np.zeros(self.length, np.int32)
        ends = np.zeros(len(texts), np.int32)
        at = 0
        for j, text in enumerate(texts):
            if not valid[j]:
                continue
            n = int(np.count_nonzero(np.asarray(text) != self.pad_id))
            if at + n > self.length:
                if j == 0:
                    raise ValueError(f'PackTexts: a caption of {n} tokens > length {self.length}')
                valid[j] = False
                continue
            tokens[at : at + n] = text[:n]
            segments[at : at + n] = j + 1
            positions[at : at + n] = np.arange(n)
            ends[j] = at + n - 1
            at += n
        return {
            **record,
            'packed_tokens': tokens,
            'packed_segments': segments,
            'packed_positions': positions,
            'packed_ends': ends,
            'texts_valid': valid[1:],
        }


# ----------------------------------------------------------------------------
# Caption-field choice (quality captions).


def check_probabilities(
    fields_and_probs: Mapping[str, float], what: str = 'caption probabilities'
) -> dict[str, float]:
    """A validated {field: probability} dict; ValueError with the offending values otherwise."""
    probs = {str(k): v for k, v in dict(fields_and_probs).items()}
    if not probs:
        raise ValueError(f'{what}: no fields given')
    for field, p in probs.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise ValueError(
                f'{what}: probability of {field!r} must be a finite number >= 0, ' f'got {p!r}'
            )
    total = math.fsum(probs.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f'{what} must sum to 1 (within 1e-6), got {total:.8g}: {probs}')
    return {k: float(v) for k, v in probs.items()}


@dataclasses.dataclass(frozen=True)
class ChooseCaption(transforms.RandomTransform):
    """record[out_key] = record[f] for one field f drawn with the given probabilities.

    Follow it with `Tokenize(out_key, tokenizer, out_key='text')`. Every listed
    field must be in the record (also those of probability 0: a misspelt name
    must not pass silently).
    """

    fields_and_probs: Mapping[str, float]
    out_key: str = 'caption_choice'

    def __post_init__(self):
        probs = check_probabilities(self.fields_and_probs, 'ChooseCaption')
        # Frozen: store the validated items as a tuple (hashable, fixed order).
        object.__setattr__(self, 'fields_and_probs', tuple(probs.items()))
        cumulative = np.cumsum([p for _, p in self.fields_and_probs])
        object.__setattr__(self, '_cumulative', cumulative / cumulative[-1])

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.fields_and_probs)

    def __call__(self, record, rng):
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise KeyError(f'ChooseCaption: no field(s) {missing}; record has {sorted(record)}')
        # side='right' skips zero-probability fields (zero-width intervals).
        i = int(np.searchsorted(self._cumulative, rng.random(), side='right'))
        field = self.fields[min(i, len(self.fields) - 1)]
        return {**record, self.out_key: record[field]}
