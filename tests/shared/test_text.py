"""Tests for shared.text: strict UTF-8 reading and SentencePiece training and loading."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os

import pytest

from shared.errors import ConfigError, DataError
from shared.padding import PAD_ID
from shared.text import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    load_sentencepiece,
    read_lines,
    read_parallel_lines,
    train_sentencepiece,
    write_bytes_atomically,
)

SUBJECTS = ["私は", "彼は", "猫が", "先生が", "子供たちは", "母は"]
PREDICATES = [
    "本を読みます。",
    "東京に行きます。",
    "水を飲みます。",
    "日本語を勉強します。",
    "公園で遊びます。",
    "ご飯を食べます。",
]
# 36 short sentences with no spaces, as Japanese is written; no pre-tokenization.
JAPANESE_CORPUS = [subject + predicate for subject in SUBJECTS for predicate in PREDICATES]
HALF_WIDTH_KATAKANA = "ｶﾀｶﾅ"
FULL_WIDTH_KATAKANA = "カタカナ"
# Above the corpus's floor (256 bytes + 4 specials + its distinct characters), below 5000.
VOCAB_SIZE = 400


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("identity")
    return train_sentencepiece(JAPANESE_CORPUS, model_dir, VOCAB_SIZE, normalization="identity")


@pytest.fixture(scope="module")
def identity_tokenizer(identity_model):
    return load_sentencepiece(identity_model.path)


@pytest.fixture(scope="module")
def nfkc_tokenizer(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("nfkc")
    model = train_sentencepiece(JAPANESE_CORPUS, model_dir, VOCAB_SIZE, normalization="nmt_nfkc")
    return load_sentencepiece(model.path)


def round_trip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode([text])[0])


# ---------------------------------------------------------------------------
# read_lines


def test_read_lines_plain(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_bytes("一行目\n  spaced  \r\nlast".encode())
    assert read_lines(path) == ["一行目", "  spaced  ", "last"]


def test_read_lines_gzip(tmp_path):
    path = tmp_path / "lines.txt.gz"
    with gzip.open(path, "wb") as handle:
        handle.write("猫\n犬\n".encode())
    assert read_lines(path) == ["猫", "犬"]


def test_read_lines_strips_bom(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    assert read_lines(path) == ["hello", "world"]


def test_read_lines_keeps_inner_bom(tmp_path):
    path = tmp_path / "inner.txt"
    path.write_bytes(b"a\n\xef\xbb\xbfb\n")
    assert read_lines(path)[1] == "\ufeffb"


def test_read_lines_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("one\ntwo\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        read_lines(path)
    message = str(caught.value)
    assert "latin1.txt" in message
    assert "line 3" in message
    assert "0xe9" in message


def test_read_lines_invalid_utf8_gzip(tmp_path):
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"ok\n\xff\n")
    with pytest.raises(DataError, match="line 2"):
        read_lines(path)


def test_read_lines_empty_line(tmp_path):
    path = tmp_path / "gap.txt"
    path.write_text("a\nb\n\nd\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_lines(path)
    message = str(caught.value)
    assert "gap.txt" in message
    assert "line 3 is empty" in message


def test_read_lines_allow_empty(tmp_path):
    path = tmp_path / "gap.txt"
    path.write_text("a\n\nc\n", encoding="utf-8")
    assert read_lines(path, allow_empty=True) == ["a", "", "c"]


def test_read_lines_source_name(tmp_path):
    path = tmp_path / "gap.txt"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="train source"):
        read_lines(path, source_name="train source")


def test_read_lines_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.txt: file not found"):
        read_lines(tmp_path / "absent.txt")


def test_read_lines_bad_gzip(tmp_path):
    path = tmp_path / "fake.txt.gz"
    path.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(DataError, match="not valid gzip"):
        read_lines(path)


# ---------------------------------------------------------------------------
# read_parallel_lines


def test_parallel_lines_aligned(tmp_path):
    source = tmp_path / "train.en"
    target = tmp_path / "train.ja"
    source.write_text("cat\ndog\n", encoding="utf-8")
    target.write_text("猫\n犬\n", encoding="utf-8")
    assert read_parallel_lines(source, target) == (["cat", "dog"], ["猫", "犬"])


def test_parallel_lines_unequal(tmp_path):
    source = tmp_path / "train.en"
    target = tmp_path / "train.ja"
    source.write_text("a\nb\nc\n", encoding="utf-8")
    target.write_text("あ\nい\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_parallel_lines(source, target)
    message = str(caught.value)
    assert "train.en" in message
    assert "train.ja" in message
    assert "has 3 lines" in message
    assert "has 2 lines" in message


def test_parallel_lines_empty_line(tmp_path):
    source = tmp_path / "train.en"
    target = tmp_path / "train.ja"
    source.write_text("a\nb\n", encoding="utf-8")
    target.write_text("あ\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.ja: line 2 is empty"):
        read_parallel_lines(source, target)


# ---------------------------------------------------------------------------
# train_sentencepiece


def test_train_special_ids(identity_tokenizer):
    assert identity_tokenizer.pad_id == PAD_ID == 0
    assert identity_tokenizer.unk_id == UNK_ID == 1
    assert identity_tokenizer.bos_id == BOS_ID == 2
    assert identity_tokenizer.eos_id == EOS_ID == 3


def test_train_writes_files(identity_model):
    model_bytes = identity_model.path.read_bytes()
    assert identity_model.sha256 == hashlib.sha256(model_bytes).hexdigest()
    recorded = identity_model.sha256_path.read_text(encoding="utf-8")
    assert recorded == f"{identity_model.sha256}  spm.model\n"
    vocab_lines = identity_model.vocab_path.read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == identity_model.vocab_size
    assert vocab_lines[0].split("\t")[0] == "<pad>"


def test_train_leaves_no_temp_files(identity_model):
    names = sorted(path.name for path in identity_model.path.parent.iterdir())
    assert names == ["spm.model", "spm.sha256", "spm.vocab"]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_train_deterministic(tmp_path, model_type):
    options = {"vocab_size": VOCAB_SIZE, "model_type": model_type, "seed": 3}
    first = train_sentencepiece(JAPANESE_CORPUS, tmp_path / "a", **options)
    second = train_sentencepiece(JAPANESE_CORPUS, tmp_path / "b", **options)
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()


def test_train_uses_only_given_sentences(tmp_path):
    small = train_sentencepiece(JAPANESE_CORPUS[:6], tmp_path / "a", VOCAB_SIZE)
    full = train_sentencepiece(JAPANESE_CORPUS, tmp_path / "b", VOCAB_SIZE)
    assert small.sha256 != full.sha256


def test_train_vocab_too_small(tmp_path):
    with pytest.raises(ConfigError, match=r"vocab_size: 100 is too small .* at least \d+ pieces"):
        train_sentencepiece(JAPANESE_CORPUS, tmp_path, vocab_size=100)


def test_train_vocab_too_large_shrinks(tmp_path, caplog):
    # hard_vocab_limit=False: a tiny corpus yields fewer pieces than requested, with a warning.
    with caplog.at_level(logging.WARNING, logger="shared.text"):
        model = train_sentencepiece(JAPANESE_CORPUS, tmp_path, vocab_size=5000)
    assert 260 < model.vocab_size < 5000
    assert "fewer than the requested 5000" in caplog.text


def test_train_skips_long_sentences(tmp_path, caplog):
    sentences = JAPANESE_CORPUS + ["長" * 100]
    with caplog.at_level(logging.WARNING, logger="shared.text"):
        train_sentencepiece(sentences, tmp_path, VOCAB_SIZE, max_sentence_length=64)
    assert "1 sentences longer than 64" in caplog.text


def test_train_no_sentences(tmp_path):
    with pytest.raises(DataError, match="No usable training sentences"):
        train_sentencepiece(["", ""], tmp_path, VOCAB_SIZE)


def test_train_bad_normalization(tmp_path):
    with pytest.raises(ConfigError, match="nmt_nfkc"):
        train_sentencepiece(JAPANESE_CORPUS, tmp_path, VOCAB_SIZE, normalization="nmt_nfck")


def test_train_bad_model_type(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        train_sentencepiece(JAPANESE_CORPUS, tmp_path, VOCAB_SIZE, model_type="word")


# ---------------------------------------------------------------------------
# Round trips and normalization


def test_round_trip_training_sentences(identity_tokenizer):
    for sentence in JAPANESE_CORPUS:
        assert round_trip(identity_tokenizer, sentence) == sentence


def test_round_trip_unseen_kanji(identity_tokenizer):
    sentence = "昨日、京都で寿司を食べました。"
    assert round_trip(identity_tokenizer, sentence) == sentence


def test_round_trip_emoji_uses_bytes(identity_tokenizer):
    sentence = "猫が😀鬱"
    token_ids = identity_tokenizer.encode([sentence])[0]
    assert UNK_ID not in token_ids
    assert identity_tokenizer.decode(token_ids) == sentence


def test_identity_keeps_half_width_katakana(identity_tokenizer):
    sentence = f"{HALF_WIDTH_KATAKANA}を書きます。"
    assert round_trip(identity_tokenizer, sentence) == sentence


def test_identity_keeps_spaces(identity_tokenizer):
    sentence = " 猫が  本を読みます。\t"
    assert round_trip(identity_tokenizer, sentence) == sentence


def test_nfkc_widens_katakana(nfkc_tokenizer):
    decoded = round_trip(nfkc_tokenizer, f"{HALF_WIDTH_KATAKANA}を書きます。")
    assert decoded == f"{FULL_WIDTH_KATAKANA}を書きます。"


def test_nfkc_rewrites_compatibility(nfkc_tokenizer):
    assert round_trip(nfkc_tokenizer, "①ﬁ") == "1fi"


# ---------------------------------------------------------------------------
# Tokenizer encode and decode


def test_encode_adds_bos_eos(identity_tokenizer):
    token_ids = identity_tokenizer.encode(["猫"], add_bos=True, add_eos=True)[0]
    assert token_ids[0] == BOS_ID
    assert token_ids[-1] == EOS_ID
    assert token_ids[1:-1] == identity_tokenizer.encode(["猫"])[0]


def test_encode_rejects_string(identity_tokenizer):
    with pytest.raises(TypeError, match=r"\[text\]"):
        identity_tokenizer.encode("猫")


def test_decode_stops_at_eos(identity_tokenizer):
    cat = identity_tokenizer.encode(["猫"])[0]
    dog = identity_tokenizer.encode(["本"])[0]
    assert identity_tokenizer.decode([BOS_ID, *cat, EOS_ID, *dog]) == "猫"


def test_decode_skips_padding(identity_tokenizer):
    cat = identity_tokenizer.encode(["猫"])[0]
    assert identity_tokenizer.decode([*cat, PAD_ID, PAD_ID]) == "猫"


def test_decode_out_of_range(identity_tokenizer):
    with pytest.raises(IndexError, match="outside the vocabulary"):
        identity_tokenizer.decode([identity_tokenizer.vocab_size])


def test_decode_batch(identity_tokenizer):
    rows = identity_tokenizer.encode(["猫", "本"], add_eos=True)
    assert identity_tokenizer.decode_batch(rows) == ["猫", "本"]


# ---------------------------------------------------------------------------
# load_sentencepiece


def test_load_carries_sha256(identity_model, identity_tokenizer):
    assert identity_tokenizer.sha256 == identity_model.sha256


def test_load_expected_sha256(identity_model):
    tokenizer = load_sentencepiece(identity_model.path, expected_sha256=identity_model.sha256)
    assert tokenizer.vocab_size == identity_model.vocab_size


def test_load_tampered_model(tmp_path):
    model = train_sentencepiece(JAPANESE_CORPUS, tmp_path, VOCAB_SIZE)
    with open(model.path, "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(DataError) as caught:
        load_sentencepiece(model.path)
    message = str(caught.value)
    assert "spm.model" in message
    assert model.sha256 in message
    assert hashlib.sha256(model.path.read_bytes()).hexdigest() in message
    assert "retrain" in message


def test_load_wrong_expected_sha256(identity_model):
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_sentencepiece(identity_model.path, expected_sha256="0" * 64)


def test_load_missing_model(tmp_path):
    with pytest.raises(DataError, match="absent.model: tokenizer model not found"):
        load_sentencepiece(tmp_path / "absent.model")


def test_load_invalid_model(tmp_path):
    path = tmp_path / "junk.model"
    path.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        load_sentencepiece(path)


def test_atomic_bytes_default_mode(tmp_path):
    path = tmp_path / "model.bin"
    write_bytes_atomically(path, b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert path.read_bytes() == b"\x00\x01"
