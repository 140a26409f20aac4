import numpy as np
import pytest

from input_pipeline.tokenizers import ByteTokenizer


def test_vocabulary():
    tok = ByteTokenizer(16)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 258)
    assert tok.encode("a") == [ord("a") + 2, tok.eos_id]


@pytest.mark.parametrize("text", ["a red circle", "café ✓ 形", "x"])
def test_round_trip(text):
    tok = ByteTokenizer(64)
    ids = tok([text])
    assert ids.shape == (1, 64) and ids.dtype == np.int32
    assert tok.decode(ids[0]) == text
    assert ids.max() < tok.vocab_size


def test_padding_and_eos_position():
    tok = ByteTokenizer(10)
    ids = tok(["ab", "abcd"])
    np.testing.assert_array_equal(ids[0], [99, 100, 1, 0, 0, 0, 0, 0, 0, 0])
    eos_index = (ids != tok.pad_id).sum(-1) - 1  # the documented EOS lookup
    np.testing.assert_array_equal(ids[np.arange(2), eos_index], tok.eos_id)


def test_truncation_keeps_eos_last():
    tok = ByteTokenizer(8)
    ids = tok(["a long caption that does not fit"])[0]
    assert ids[-1] == tok.eos_id and (ids != tok.pad_id).all()
    assert tok.decode(ids) == "a long "
    assert (ids == tok.eos_id).sum() == 1


@pytest.mark.parametrize("bad", ["", "   \n", b"\xff\xfe", "\ud800"])
def test_bad_text_raises_value_error(bad):
    with pytest.raises(ValueError):
        ByteTokenizer(8)([bad])


def test_bytes_input_and_single_string_misuse():
    tok = ByteTokenizer(8)
    np.testing.assert_array_equal(tok([b"hi"]), tok(["hi"]))
    with pytest.raises(TypeError):
        tok("hi")
    assert tok([]).shape == (0, 8)
