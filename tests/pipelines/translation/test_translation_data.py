"""Tests of the translation data layer: loading, bad input, splits, tokenizers and batches."""

import dataclasses
import gzip
import logging

import numpy as np
import pytest

from pipelines.translation.data import (
    ParallelSplit,
    compute_log_unigram,
    encode_pairs,
    load_split,
    load_tokenizers,
    make_pair_dataset,
    parse_tsv_pairs,
    split_pairs,
    train_tokenizers,
)
from shared.errors import ConfigError, DataError
from shared.text import BOS_ID, EOS_ID, load_sentencepiece, train_sentencepiece


def test_load_files_train(tiny_config, tmp_path):
    split = load_split(tiny_config.data, tmp_path, "train")
    assert split.source[1] == "a cat sleeps"


def test_load_files_aligned(tiny_config, tmp_path):
    split = load_split(tiny_config.data, tmp_path, "test")
    assert split.target[0] == "ein hund rennt"


def test_load_unknown_split(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="test_2016_flickr"):
        load_split(tiny_config.data, tmp_path, "test_2016_flickr")


def test_unequal_files_name_both(tiny_config, corpus_files, tmp_path):
    corpus_files["train.de"].write_text("ein hund rennt\n", encoding="utf-8")
    with pytest.raises(DataError, match="train.de"):
        load_split(tiny_config.data, tmp_path, "train")


def test_empty_line_names_line(tiny_config, corpus_files, tmp_path):
    corpus_files["train.en"].write_text("a dog\n\nthree\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_split(tiny_config.data, tmp_path, "train")


def test_bad_utf8_names_line(tiny_config, corpus_files, tmp_path):
    corpus_files["train.en"].write_bytes(b"a dog\nbad \xff byte\n")
    with pytest.raises(DataError, match="line 2"):
        load_split(tiny_config.data, tmp_path, "train")


def test_missing_file_named(tiny_config, tmp_path):
    data = dataclasses.replace(tiny_config.data, train_source=str(tmp_path / "absent.en"))
    with pytest.raises(DataError, match="absent.en"):
        load_split(data, tmp_path, "train")


def test_missing_multi30k_lists_files(tmp_path):
    from pipelines.translation.config import DEFAULT

    with pytest.raises(DataError, match="test_2016_flickr.de.gz"):
        load_split(DEFAULT.data, tmp_path, "train")


def test_tsv_pairs_columns():
    english, spanish = parse_tsv_pairs(["Go.\tVe.\tCC-BY", "Hi.\tHola."], "pairs.txt")
    assert (english, spanish) == (["Go.", "Hi."], ["Ve.", "Hola."])


def test_tsv_bad_line_named():
    with pytest.raises(DataError, match="pairs.txt: line 2"):
        parse_tsv_pairs(["Go.\tVe.", "no tab here"], "pairs.txt")


def test_anki_file_direction(tmp_path):
    from pipelines.translation.config import TranslationDataConfig

    folder = tmp_path / "translation" / "anki"
    folder.mkdir(parents=True)
    lines = [f"Sentence {i}.\tFrase {i}.\tCC-BY" for i in range(20)]
    with gzip.open(folder / "spa-eng_spa.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    config = TranslationDataConfig(dataset="anki", source_language="es", target_language="en")
    split = load_split(config, tmp_path, "val")
    assert split.source[0].replace("Frase", "Sentence") == split.target[0]


def test_split_pairs_sizes():
    source = [str(i) for i in range(20)]
    parts = split_pairs(source, source, 0.15, 0.15)
    assert [len(parts[name][0]) for name in ("train", "val", "test")] == [14, 3, 3]


def test_split_pairs_repeat():
    source = [str(i) for i in range(20)]
    assert (
        split_pairs(source, source, 0.2, 0.0)["val"] == split_pairs(source, source, 0.2, 0.0)["val"]
    )


def test_overlong_pairs_dropped(tiny_config, tmp_path, caplog):
    train = load_split(tiny_config.data, tmp_path, "train")
    tokenizers = train_tokenizers(tiny_config.data, train, tmp_path / "run", seed=0)
    lengths = [len(tokenizers.source.encode([s], add_eos=True)[0]) for s in train.source]
    limit = sorted(lengths)[-3]  # Pairs longer than the third-longest source are dropped.
    expected = sum(
        length > limit or len(tokenizers.target.encode([t], add_eos=True)[0]) > limit
        for length, t in zip(lengths, train.target, strict=True)
    )
    with caplog.at_level(logging.WARNING):
        source_ids, _ = encode_pairs(tokenizers, train, limit)
    assert len(source_ids) == len(train) - expected
    assert f"dropped {expected} of 12" in caplog.text


def test_tokenizers_reload_same(tiny_config, tmp_path):
    train = ParallelSplit("train", ["a dog runs"] * 5, ["ein hund rennt"] * 5)
    trained = train_tokenizers(tiny_config.data, train, tmp_path, seed=0)
    loaded = load_tokenizers(tiny_config.data, tmp_path)
    assert loaded.target.sha256 == trained.target.sha256


def test_tokenizers_per_side(tiny_config, tmp_path):
    train = ParallelSplit("train", ["a dog runs"] * 5, ["ein hund rennt"] * 5)
    tokenizers = train_tokenizers(tiny_config.data, train, tmp_path, seed=0)
    assert tokenizers.source.sha256 != tokenizers.target.sha256


def test_joint_tokenizer_shared(tiny_config, tmp_path):
    data = dataclasses.replace(tiny_config.data, joint_vocabulary=True)
    train = ParallelSplit("train", ["a dog runs"] * 5, ["ein hund rennt"] * 5)
    tokenizers = train_tokenizers(data, train, tmp_path, seed=0)
    assert tokenizers.source is tokenizers.target


def test_japanese_round_trip(tmp_path):
    sentences = [
        "今日は良い天気ですね。",
        "私は猫が好きです。",
        "ｶﾀｶﾅと全角？も残る。",
        "東京へ行きます！",
    ] * 3
    model = train_sentencepiece(sentences, tmp_path, 300, normalization="identity")
    tokenizer = load_sentencepiece(model.path)
    unseen = "見たことのない漢字、鬱。"
    decoded = [tokenizer.decode(ids) for ids in tokenizer.encode([*sentences[:4], unseen])]
    assert decoded == [*sentences[:4], unseen]


def test_auto_normalization_japanese(tiny_config, tmp_path):
    from pipelines.translation.data import resolve_normalization

    assert resolve_normalization(tiny_config.data, "ja") == "identity"


def test_pair_dataset_teacher_forcing():
    dataset = make_pair_dataset([[5, 6, EOS_ID]], [[7, 8, 9, EOS_ID]], 4, (8,))
    inputs, labels = next(iter(dataset))
    assert inputs["target_input_ids"].numpy().tolist() == [[BOS_ID, 7, 8, 9]]
    assert labels.numpy().tolist() == [[7, 8, 9, EOS_ID]]


def test_pair_dataset_buckets_lengths():
    source = [[5] * n + [EOS_ID] for n in (2, 2, 9, 9)]
    dataset = make_pair_dataset(source, source, 2, (4, 16))
    widths = sorted(int(inputs["source_ids"].shape[1]) for inputs, _ in dataset)
    assert widths == [3, 10]


def test_log_unigram_values():
    log_probs = compute_log_unigram([[1, 1, 2]], 4)
    # Add-one counts: [1, 3, 2, 1] over 7.
    np.testing.assert_allclose(np.exp(log_probs), [1 / 7, 3 / 7, 2 / 7, 1 / 7], rtol=1e-6)
