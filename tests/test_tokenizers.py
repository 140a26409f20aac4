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


# -- SentencePiece and Hugging Face tokenizer files, trained here -------------------------------

import pickle  # noqa: E402

import sentencepiece  # noqa: E402
import tokenizers as hf  # noqa: E402

from input_pipeline.tokenizers import (  # noqa: E402
    HFTokenizer,
    SentencePieceTokenizer,
    make_tokenizer,
)

CORPUS = [
    'a red circle to the left of a blue square',
    'two green triangles on a striped background',
    'a small yellow star above a large purple hexagon',
    'the orange cross is below the cyan diamond.',
    'A photo of three grey squares, one of them tiny',
] * 20
TEXTS = ['a red star', 'Two purple crosses to the left of a cyan circle.', 'zebra café 形']


def train_sentencepiece(tmp_path, name='sp', **options):
    prefix = str(tmp_path / name)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=prefix,
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return prefix + '.model'


def train_hf(tmp_path, kind='bpe', name='tokenizer.json'):
    from tokenizers import models, pre_tokenizers, processors, trainers

    if kind == 'bpe':
        tok = hf.Tokenizer(models.BPE(unk_token='<unk>'))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=['<unk>', '</s>', '<pad>'])
    else:  # BERT-style WordPiece with a [CLS] ... [SEP] post-processor
        tok = hf.Tokenizer(models.WordPiece(unk_token='[UNK]'))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=120, special_tokens=['[UNK]', '[CLS]', '[SEP]']
        )
    tok.train_from_iterator(CORPUS, trainer)
    if kind != 'bpe':
        cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
        tok.post_processor = processors.TemplateProcessing(
            single='[CLS] $A [SEP]', special_tokens=[('[CLS]', cls), ('[SEP]', sep)]
        )
        tok.enable_truncation(8)  # the file's own truncation must not apply
    path = tmp_path / name
    tok.save(str(path))
    return str(path), tok


def check_ids_layout(tok, ids, body):
    """ids = body + EOS + padding, truncated keeping EOS last."""
    L = tok.context_length
    want = (body + [tok.eos_id])[:L]
    want[-1] = tok.eos_id
    want += [tok.pad_id] * (L - len(want))
    np.testing.assert_array_equal(ids, want)
    assert ids.dtype == np.int32 and ids.shape == (L,)
    eos_index = (ids != tok.pad_id).sum() - 1  # the documented EOS lookup
    assert ids[eos_index] == tok.eos_id


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_matches_the_library(tmp_path, model_type):
    path = train_sentencepiece(tmp_path, model_type=model_type)
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    for context_length in (100, 6):  # longer than 77, and truncating
        tok = make_tokenizer('sentencepiece', context_length, path)
        assert isinstance(tok, SentencePieceTokenizer)
        # SentencePiece trains without a pad piece: one id past the vocabulary.
        assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (
            sp.eos_id(),
            sp.get_piece_size(),
            sp.get_piece_size() + 1,
        )
        ids = tok([t for t in TEXTS])
        for text, row in zip(TEXTS, ids):
            check_ids_layout(tok, row, sp.encode(text, out_type=int))
        assert ids.max() < tok.vocab_size
    assert tok.decode(make_tokenizer('sentencepiece', 100, path).tokenize(TEXTS[1])) == sp.decode(
        sp.encode(TEXTS[1])
    )


def test_sentencepiece_pad_piece_and_missing_eos(tmp_path):
    with_pad = train_sentencepiece(tmp_path, 'pad', pad_id=3)
    tok = SentencePieceTokenizer(with_pad, 16)
    assert (
        tok.pad_id == 3
        and tok.vocab_size
        == sentencepiece.SentencePieceProcessor(model_file=with_pad).get_piece_size()
    )
    no_eos = train_sentencepiece(tmp_path, 'noeos', eos_id=-1)
    with pytest.raises(ValueError, match=r"noeos\.model.*no EOS piece"):
        SentencePieceTokenizer(no_eos, 16)


def test_sentencepiece_bad_text_and_pickle(tmp_path):
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path), 16)
    for bad in ['', '  ', b'\xff', '\ud800']:
        with pytest.raises(ValueError):
            tok.tokenize(bad)
    # Process workers receive the tokenizer pickled.
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.tokenize(TEXTS[0]), tok.tokenize(TEXTS[0]))


def test_hf_bpe_matches_the_library(tmp_path):
    path, lib = train_hf(tmp_path, 'bpe')
    tok = make_tokenizer('hf', 90, path)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == lib.token_to_id('</s>') and tok.pad_id == lib.token_to_id('<pad>')
    assert tok.vocab_size == lib.get_vocab_size()
    for text in TEXTS:
        check_ids_layout(tok, tok.tokenize(text), lib.encode(text).ids)
    assert tok.decode(tok.tokenize('a red circle')) == lib.decode(lib.encode('a red circle').ids)
    # A directory holding tokenizer.json works too.
    np.testing.assert_array_equal(
        make_tokenizer('hf', 90, str(tmp_path)).tokenize('a'), tok.tokenize('a')
    )


def test_hf_special_tokens_in_the_text_are_plain_text(tmp_path):
    path, lib = train_hf(tmp_path, 'bpe')
    tok = HFTokenizer(path, 64)
    for t in (tok, pickle.loads(pickle.dumps(tok))):  # also in a worker process
        ids = t.tokenize('a red </s> circle <pad> here').tolist()
        body = ids[: ids.index(t.eos_id)]
        assert t.pad_id not in body and ids.count(t.eos_id) == 1
    assert lib.token_to_id('</s>') in lib.encode('a red </s> circle').ids  # the library's default


def test_hf_wordpiece_without_pad_uses_an_extra_id(tmp_path):
    path, lib = train_hf(tmp_path, 'wordpiece')
    tok = HFTokenizer(path, 12)
    # No pad token in the file: one id past the vocabulary. EOS: BERT's [SEP].
    assert tok.eos_id == lib.token_to_id('[SEP]')
    assert (tok.pad_id, tok.vocab_size) == (lib.get_vocab_size(), lib.get_vocab_size() + 1)
    lib.no_truncation()
    for text in TEXTS:
        # No [CLS]/[SEP] from the file's post-processor, and not its truncation to 8.
        body = lib.encode(text, add_special_tokens=False).ids
        check_ids_layout(tok, tok.tokenize(text), body)
    assert len(lib.encode(TEXTS[1], add_special_tokens=False).ids) > 8
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.tokenize(TEXTS[1]), tok.tokenize(TEXTS[1]))


def test_hf_pad_equal_to_eos_is_not_used(tmp_path):
    path, lib = train_hf(tmp_path, 'bpe')
    lib.enable_padding(pad_id=lib.token_to_id('</s>'), pad_token='</s>')  # as CLIP's files do
    lib.save(str(tmp_path / 'clip_like.json'))
    tok = HFTokenizer(str(tmp_path / 'clip_like.json'), 16)
    assert tok.eos_id == lib.token_to_id('</s>') and tok.pad_id == lib.get_vocab_size()
    named = HFTokenizer(path, 16, eos_token='<unk>', pad_token='</s>')
    assert (named.eos_id, named.pad_id) == (lib.token_to_id('<unk>'), lib.token_to_id('</s>'))


def test_hf_missing_eos_names_the_file(tmp_path):
    from tokenizers import models, pre_tokenizers, trainers

    lib = hf.Tokenizer(models.BPE(unk_token='<unk>'))
    lib.pre_tokenizer = pre_tokenizers.Whitespace()
    lib.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=80, special_tokens=['<unk>']))
    lib.save(str(tmp_path / 'noeos.json'))
    with pytest.raises(ValueError, match=r"noeos\.json.*no EOS token.*</s>"):
        HFTokenizer(str(tmp_path / 'noeos.json'), 16)
    with pytest.raises(ValueError, match=r"noeos\.json.*no token '\[SEP\]'"):
        HFTokenizer(str(tmp_path / 'noeos.json'), 16, eos_token='[SEP]')


def test_make_tokenizer_errors(tmp_path):
    assert isinstance(make_tokenizer('bytes', 100), ByteTokenizer)
    with pytest.raises(
        ValueError, match="unknown tokenizer 'bpe'; valid: bytes, sentencepiece, hf, shapes_bpe"
    ):
        make_tokenizer('bpe', 16)
    with pytest.raises(ValueError, match='needs a path to a SentencePiece .model'):
        make_tokenizer('sentencepiece', 16)
    with pytest.raises(ValueError, match="reads no file"):
        make_tokenizer('bytes', 16, 'x.model')
    with pytest.raises(ValueError, match=r"not found: '.*missing\.model'"):
        make_tokenizer('sentencepiece', 16, str(tmp_path / 'missing.model'))
    (tmp_path / 'junk.model').write_bytes(b'not a model')
    with pytest.raises(ValueError, match=r"cannot load SentencePiece model '.*junk\.model'"):
        make_tokenizer('sentencepiece', 16, str(tmp_path / 'junk.model'))
    (tmp_path / 'junk.json').write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"cannot load Hugging Face tokenizer '.*junk\.json'"):
        make_tokenizer('hf', 16, str(tmp_path / 'junk.json'))
    with pytest.raises(ValueError, match='context_length'):
        make_tokenizer('bytes', 1)


def test_shapes_bpe_is_the_file_write_tokenizer_builds(tmp_path):
    # The shipped vocabulary is reproducible from the shapes seeds; if the captions change,
    # rebuild it: python -m input_pipeline.sources.shapes --write_tokenizer input_pipeline/shapes_bpe.json
    from input_pipeline import tokenizers
    from input_pipeline.sources import shapes

    shapes.write_tokenizer(str(tmp_path / 'bpe.json'))
    assert (tmp_path / 'bpe.json').read_bytes() == open(tokenizers.SHAPES_BPE_PATH, 'rb').read()


def test_shapes_bpe_fits_every_caption_in_32_tokens_and_round_trips():
    import re

    from input_pipeline.sources import shapes

    tok = make_tokenizer('shapes_bpe', 32)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (1024, 0, 1)
    with pytest.raises(ValueError, match="built in"):
        make_tokenizer('shapes_bpe', 32, 'x.json')
    # Held-out scenes (another seed than the 5,000 records it was trained on).
    source = shapes.ShapesSource(split='train', seed=7, image_size=16, num_records=300)
    longest = {}
    for i in range(300):
        r = source[i]
        sentences = re.split(r'(?<=\.) ', r['long_caption'])
        for field, texts in (('alt_text', [r['alt_text']]), ('caption', [r['caption']]), ('sentence', sentences)):
            for text in texts:
                ids = tok.tokenize(text)
                assert tok.decode(ids) == text
                longest[field] = max(longest.get(field, 0), int((ids != tok.pad_id).sum()))
    assert longest['caption'] <= 16 and longest['sentence'] <= 32 and longest['alt_text'] <= 32, longest
    # Text it never saw still encodes (byte fallback), never into pad or EOS ids mid-text.
    ids = tok.encode('Zebra 7% ünïcode </s>')
    assert tok.decode(ids) == 'Zebra 7% ünïcode </s>' and 0 not in ids[:-1] and 1 not in ids[:-1]
