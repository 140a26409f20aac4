"""Captions: sentence splitting, sub-caption sampling, caption-field choice, end to end."""

import json

import numpy as np
import pytest

from configs import dreamlip
from input_pipeline import captions, pipeline, transforms
from input_pipeline.captions import ChooseCaption, SampleSubcaptions, split_sentences
from input_pipeline.loader import make_loader
from input_pipeline.sources.shapes import ShapesSource
from input_pipeline.tokenizers import ByteTokenizer

# ----------------------------------------------------------------------------
# Splitting

SPLIT_CASES = [
    ("A dog runs. A cat sleeps!", ["A dog runs.", "A cat sleeps!"]),
    # titles, initials, approx. before a decimal
    (
        "Dr. Smith met Mr. J. R. Tolkien approx. 3.5 cm from the door. Then they left.",
        ["Dr. Smith met Mr. J. R. Tolkien approx. 3.5 cm from the door.", "Then they left."],
    ),
    (
        "Fruit, e.g. Apples, i.e. red ones, vs. Pears. Next.",
        ["Fruit, e.g. Apples, i.e. red ones, vs. Pears.", "Next."],
    ),
    (
        "It is 3.5 cm long. It weighs 2.75 kg. 3 cats sit.",
        ["It is 3.5 cm long.", "It weighs 2.75 kg.", "3 cats sit."],
    ),
    # ellipses: split before a capital, not before lowercase
    (
        "Wait... Then it rained... and stopped. The end…  Really?! Yes!",
        ["Wait...", "Then it rained... and stopped.", "The end…", "Really?!", "Yes!"],
    ),
    # closing quotes and brackets stay with their sentence
    (
        'He said "stop." Then he left. She asked "why?" Nobody knew.',
        ['He said "stop."', "Then he left.", 'She asked "why?"', "Nobody knew."],
    ),
    ("(The ring is left.) The cross is right.", ["(The ring is left.)", "The cross is right."]),
    # bullets and numbered lists, with and without final periods
    (
        "- A red circle.\n- A blue square\n* A green ring\n• A cross\n1. First item.\n2) Second",
        ["A red circle.", "A blue square", "A green ring", "A cross", "First item.", "Second"],
    ),
    # a soft wrap joins, a blank line or a capitalised line starts a new sentence
    (
        "The image shows a cat\nsitting on a mat. Another one.\n\nNew paragraph\nHere too",
        ["The image shows a cat sitting on a mat.", "Another one.", "New paragraph", "Here too"],
    ),
    # number abbreviations only before a digit
    (
        "See Fig. 3 for details. No. It is blue. Item No. 5 is red.",
        ["See Fig. 3 for details.", "No.", "It is blue.", "Item No. 5 is red."],
    ),
    ("Apples etc. and pears etc. Then done.", ["Apples etc. and pears etc.", "Then done."]),
    ("Visit example.com today.\tThanks  a lot.", ["Visit example.com today.", "Thanks a lot."]),
    ("no final period", ["no final period"]),
    ("", []),
    ("   \n\n ", []),
    ("...", []),
    ("- \n* \n1. ", []),
]


@pytest.mark.parametrize("text, want", SPLIT_CASES)
def test_split_sentences(text, want):
    assert split_sentences(text) == want


def test_split_recovers_shapes_sentences():
    # Shapes long captions are their sentences joined by single spaces.
    source = ShapesSource(image_size=16, num_records=1000)
    for i in range(200):
        caption = source[i]["long_caption"]
        sentences = split_sentences(caption)
        assert 2 <= len(sentences) <= 4
        assert " ".join(sentences) == caption
        assert all(s.endswith(".") and s[0].isupper() for s in sentences)


# ----------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("seed", range(20))
def test_sample_indices(seed):
    rng = np.random.default_rng(seed)
    k = 4
    index, valid = captions.sample_subcaption_indices(7, k, rng, "replace")
    assert len(set(index.tolist())) == k and valid.all() and index.max() < 7  # no repeats
    for fill in ("replace", "pad"):
        index, valid = captions.sample_subcaption_indices(4, k, rng, fill)
        assert sorted(index.tolist()) == [0, 1, 2, 3] and valid.all()  # n == k: a permutation
    index, valid = captions.sample_subcaption_indices(3, k, rng, "replace")
    assert set(index.tolist()) == {0, 1, 2} and valid.all()  # every sentence, one twice
    index, valid = captions.sample_subcaption_indices(3, k, rng, "pad")
    assert sorted(index[valid].tolist()) == [0, 1, 2] and valid.tolist() == [1, 1, 1, 0]
    assert index[~valid].tolist() == [-1]
    for fill in ("replace", "pad"):  # nothing to replace with: all padding
        index, valid = captions.sample_subcaption_indices(0, k, rng, fill)
        assert index.tolist() == [-1] * k and not valid.any()


def test_bad_sampling_settings():
    tok = ByteTokenizer(16)
    with pytest.raises(ValueError, match="fill"):
        SampleSubcaptions(tokenizer=tok, fill="repeat")
    with pytest.raises(ValueError, match="k must"):
        SampleSubcaptions(tokenizer=tok, k=0)


def test_sample_subcaptions_transform():
    tok = ByteTokenizer(24)
    record = {"long_caption": "One cat. Two dogs sit here! A bird?", "id": 3}
    sentences = split_sentences(record["long_caption"])
    out = SampleSubcaptions(tokenizer=tok, k=5, fill="pad")(record, np.random.default_rng(0))
    assert out["texts"].shape == (5, 24) and out["texts"].dtype == np.int32
    assert out["texts_valid"].dtype == bool and out["texts_valid"].tolist() == [1, 1, 1, 0, 0]
    assert sorted(tok.decode(t) for t in out["texts"][:3]) == sorted(sentences)
    # padding rows: a lone EOS, then pad ids (finite under EOS and mean pooling)
    np.testing.assert_array_equal(out["texts"][3:, 0], tok.eos_id)
    np.testing.assert_array_equal(out["texts"][3:, 1:], tok.pad_id)
    assert out["id"] == 3 and out["long_caption"] == record["long_caption"]

    empty = SampleSubcaptions(tokenizer=tok, k=2)(
        {"long_caption": " ... "}, np.random.default_rng(0)
    )
    assert not empty["texts_valid"].any()


def test_random_transform_needs_a_key():
    t = SampleSubcaptions(tokenizer=ByteTokenizer(16), k=2)
    record = {"long_caption": "A b. C d. E f."}
    with pytest.raises(ValueError, match="rng_key"):
        transforms.apply([t], record)
    a = transforms.apply([t], record, rng_key=(0, 0, 5))
    np.testing.assert_array_equal(
        a["texts"], transforms.apply([t], record, rng_key=(0, 0, 5))["texts"]
    )


# ----------------------------------------------------------------------------
# In the loader: determinism, resume, elasticity, epochs

N, B, K = 16, 8, 2


def _loader(**kw):
    steps = [
        SampleSubcaptions(tokenizer=ByteTokenizer(128), k=K),
        transforms.SelectFields(("texts", "texts_valid", "id")),
    ]
    return make_loader(
        ShapesSource(image_size=16, num_records=N),
        steps,
        **{"global_batch_size": B, "seed": 0, **kw},
    )


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _by_id(batches):
    """{(epoch, id): texts} over consecutive batches from the stream's start."""
    out, position = {}, 0
    for b in batches:
        for i, texts in zip(b["id"], b["texts"]):
            out[(position // N, int(i))] = texts
            position += 1
    return out


def test_subcaptions_deterministic_resumable_and_new_each_epoch():
    reference = _take(_loader(), 6)  # 3 epochs
    again = _take(_loader(), 6)
    for x, y in zip(reference, again):
        np.testing.assert_array_equal(x["texts"], y["texts"])

    first = _loader(prefetch=3)
    _take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = _loader()
    resumed.set_state(state)
    for x, y in zip(_take(resumed, 3), reference[3:]):
        np.testing.assert_array_equal(x["texts"], y["texts"])
        np.testing.assert_array_equal(x["id"], y["id"])

    texts = _by_id(reference)
    differ = [not np.array_equal(texts[(0, i)], texts[(1, i)]) for i in range(N)]
    assert sum(differ) >= N // 4  # epochs redraw (some records redraw the same by chance)
    other_seed = _by_id(_take(_loader(seed=1), 2))
    assert any(not np.array_equal(texts[(0, i)], other_seed[(0, i)]) for i in range(N))


def test_subcaptions_do_not_depend_on_process_count():
    one = _by_id(_take(_loader(), 2))
    two = {}
    for p in range(2):
        for b in _take(_loader(process_index=p, process_count=2), 2):
            for i, texts in zip(b["id"], b["texts"]):
                two[int(i)] = texts
    assert sorted(two) == list(range(N))
    for i in range(N):
        np.testing.assert_array_equal(one[(0, i)], two[i])


# ----------------------------------------------------------------------------
# Caption choice


def test_choose_caption_frequencies():
    probs = {"alt_text": 0.2, "caption": 0.5, "long_caption": 0.3, "never": 0.0}
    choose = ChooseCaption(probs, out_key="chosen")
    record = {"alt_text": "a", "caption": "c", "long_caption": "l", "never": "n"}
    n = 10_000
    picks = [transforms.apply([choose], record, rng_key=(0, 0, i))["chosen"] for i in range(n)]
    counts = {v: picks.count(v) for v in "acln"}
    assert counts["n"] == 0
    for field, key in [("alt_text", "a"), ("caption", "c"), ("long_caption", "l")]:
        p = probs[field]
        assert abs(counts[key] / n - p) < 5 * np.sqrt(p * (1 - p) / n), counts  # 5 sigma
    # deterministic in the key; a new epoch redraws
    again = [transforms.apply([choose], record, rng_key=(0, 0, i))["chosen"] for i in range(200)]
    assert again == picks[:200]
    epoch1 = [transforms.apply([choose], record, rng_key=(0, 1, i))["chosen"] for i in range(200)]
    assert epoch1 != picks[:200]


@pytest.mark.parametrize(
    "probs, match",
    [
        ({}, "no fields"),
        ({"caption": 0.7, "alt_text": 0.2}, "sum to 1"),
        ({"caption": 1.2, "alt_text": -0.2}, ">= 0"),
        ({"caption": float("nan"), "alt_text": 1.0}, "finite"),
        ({"caption": "0.5", "alt_text": 0.5}, "number"),
    ],
)
def test_bad_caption_probabilities(probs, match):
    with pytest.raises(ValueError, match=match):
        ChooseCaption(probs)


def test_choose_caption_missing_field():
    choose = ChooseCaption({"caption": 0.5, "rewritten": 0.5})
    with pytest.raises(KeyError, match="rewritten"):
        transforms.apply([choose], {"caption": "x"}, rng_key=(0, 0, 0))
    assert ChooseCaption({"caption": 0.5, "alt_text": 0.5 + 5e-7}).fields == ("caption", "alt_text")


# ----------------------------------------------------------------------------
# End to end through the config and pipeline


def _config(**input_overrides):
    config = dreamlip.get_config()
    config.batch_size = 8
    # Pinned here, not read from the recipe, so these tests keep their meaning when the
    # DreamLIP config is retuned: K=6 > the 2-4 sentences of a shapes long caption.
    config.input.caption_field = "caption"
    config.input.tokenizer = "bytes"  # the checks below decode with ByteTokenizer
    config.input.context_length = 128
    config.input.num_subcaptions = 6
    config.input.subcaption_context_length = 128
    config.model.text.context_length = 128  # the loader checks that the tower takes them
    config.input.image_size = 16
    config.input.epoch_size = 64
    for k, v in input_overrides.items():
        config.input[k] = v
    return config


def _next(config, fields):
    with pipeline.train_loader(config, fields=fields) as loader:
        return next(loader)


def test_default_text_pipeline_is_unchanged():
    steps = pipeline.record_transforms(_config().input, ("image", "text"))
    assert [type(s) for s in steps] == [transforms.Tokenize, transforms.SelectFields]
    assert steps[0].field == "caption"


@pytest.mark.parametrize("fill", ["replace", "pad"])
def test_train_loader_builds_subcaptions(fill):
    config = _config(subcaption_fill=fill)
    batch = _next(config, ("image", "text", "texts", "texts_valid", "id"))
    k, lsub = config.input.num_subcaptions, config.input.subcaption_context_length
    assert sorted(batch) == ["id", "image", "text", "texts", "texts_valid"]
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert (
        batch["text"].shape == (8, config.input.context_length) and batch["text"].dtype == np.int32
    )
    assert batch["texts"].shape == (8, k, lsub) and batch["texts"].dtype == np.int32
    assert batch["texts_valid"].shape == (8, k) and batch["texts_valid"].dtype == bool
    source = pipeline.make_source(config.input, seed=config.seed)
    tok = ByteTokenizer(lsub)
    for row, i in enumerate(batch["id"]):
        record = source[int(i)]
        assert tok.decode(batch["text"][row]) == record["caption"]
        sentences = split_sentences(record["long_caption"])
        decoded = [
            tok.decode(t) for t, ok in zip(batch["texts"][row], batch["texts_valid"][row]) if ok
        ]
        assert set(decoded) == set(sentences)  # all present (K=6 > 2..4 sentences) ...
        assert len(decoded) == (
            k if fill == "replace" else len(sentences)
        )  # ... repeated or padded


def test_train_loader_builds_only_what_is_asked():
    assert sorted(_next(_config(), ("image", "texts_valid"))) == ["image", "texts_valid"]
    # A field the pipeline does not build is a record text field to tokenize: a misspelt
    # one is named at start, with the text fields the records have.
    with pytest.raises(pipeline.InputError, match=r"\['texts_mask'\] that 'shapes' records"):
        pipeline.train_loader(_config(), fields=("image", "texts_mask"))
    with pytest.raises(pipeline.InputError, match=r"\['seg_map'\].*alt_text, caption, long"):
        pipeline.train_loader(_config(), fields=("image", "seg_map"))
    batch = _next(_config(), ("text", "alt_text", "id"))
    source = pipeline.make_source(_config().input, seed=0)
    tok = ByteTokenizer(128)
    for row, i in enumerate(batch["id"]):
        assert tok.decode(batch["alt_text"][row]) == source[int(i)]["alt_text"]
        assert tok.decode(batch["text"][row]) == source[int(i)]["caption"]


def test_train_loader_caption_probs():
    probs = {"alt_text": 0.5, "caption": 0.5}
    config = _config(caption_probs=probs, context_length=128)
    batch = _next(config, ("text", "texts", "id"))
    source = pipeline.make_source(config.input, seed=config.seed)
    tok = ByteTokenizer(128)
    chosen = []
    for row, i in enumerate(batch["id"]):
        record = source[int(i)]
        text = tok.decode(batch["text"][row])
        assert text in (record["alt_text"], record["caption"])
        chosen.append(text == record["caption"])
    assert 0 < sum(chosen) < len(chosen)  # both fields occur (p = 2 * 0.5**8 of failing)
    # Sub-caption draws have their own stream: choosing the caption does not change them.
    plain = _next(_config(), ("texts", "id"))
    np.testing.assert_array_equal(plain["id"], batch["id"])
    np.testing.assert_array_equal(plain["texts"], batch["texts"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(caption_probs={"caption": 0.5, "rewritten": 0.5}), "rewritten"),
        (dict(caption_probs={"caption": 0.5, "alt_text": 0.6}), "input.caption_probs"),
        (dict(subcaption_field="longer_caption"), "longer_caption"),
        (dict(subcaption_fill="repeat"), "fill"),
    ],
)
def test_train_loader_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        pipeline.train_loader(_config(**overrides), fields=("text", "texts"))


def test_caption_fields_from_the_command_line():
    from pretrain import config_cli

    config = _config(caption_probs={"alt_text": 0.0, "caption": 1.0})
    config.lock()
    config_cli.apply_override(config, "input.num_subcaptions", "3")
    config_cli.apply_override(config, "input.subcaption_fill", "pad")
    config_cli.apply_override(config, "input.caption_probs.alt_text", "0.25")
    config_cli.apply_override(config, "input.caption_probs.caption", "0.75")
    assert pipeline.caption_probs(config.input) == {"alt_text": 0.25, "caption": 0.75}
    sample = pipeline.record_transforms(config.input, ("texts",))[0]
    assert (sample.k, sample.fill) == (3, "pad")
    assert pipeline.caption_probs(_config().input) == {"caption": 1.0}


def test_pack_texts_puts_real_tokens_back_to_back_and_drops_what_does_not_fit():
    pad = 0
    record = {
        "text": np.array([5, 6, 1, 0, 0], np.int32),  # 3 real tokens
        "texts": np.array(
            [[7, 1, 0, 0], [1, 0, 0, 0], [8, 9, 2, 1], [3, 1, 0, 0]], np.int32
        ),  # 2, (invalid), 4, 2 tokens
        "texts_valid": np.array([True, False, True, True]),
    }
    out = captions.PackTexts(10, pad_id=pad)(record)
    np.testing.assert_array_equal(out["packed_tokens"], [5, 6, 1, 7, 1, 8, 9, 2, 1, 0])
    np.testing.assert_array_equal(out["packed_segments"], [1, 1, 1, 2, 2, 4, 4, 4, 4, 0])
    np.testing.assert_array_equal(out["packed_positions"], [0, 1, 2, 0, 1, 0, 1, 2, 3, 0])
    # The last sentence (2 tokens) no longer fits in 10: dropped, marked invalid.
    np.testing.assert_array_equal(out["packed_ends"], [2, 4, 0, 8, 0])
    np.testing.assert_array_equal(out["texts_valid"], [True, False, True, False])
    assert record["texts_valid"][3]  # the input record is left as it was
    with pytest.raises(ValueError, match="a caption of 3 tokens > length 2"):
        captions.PackTexts(2)(record)
