"""Tests of the sentiment data layer: safe archive reading, file formats, splits and truncation."""

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.sentiment.config import DataConfig
from pipelines.sentiment.data import (
    clean_text,
    compute_class_weights,
    iter_imdb_reviews,
    load_imdb,
    load_label_table,
    load_splits,
    load_sst,
    read_input_lines,
    split_into_sentences,
    split_stratified,
    truncate_ids,
    LabeledTexts,
)
from shared.errors import ConfigError, DataError


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_imdb_archive(path: Path, extra=None) -> Path:
    """Write a tiny aclImdb archive: 3 train and 2 test reviews, plus optional extra members."""
    with tarfile.open(path, "w:gz") as tar:
        add_file(tar, "aclImdb/imdb.vocab", b"the\nmovie\n")
        add_file(tar, "aclImdb/train/pos/0_9.txt", b"Great film.<br /><br />Loved it")
        add_file(tar, "aclImdb/train/neg/1_2.txt", b"Dull and slow.")
        add_file(tar, "aclImdb/train/pos/2_8.txt", "Caf\u00e9 scene was superb".encode())
        add_file(tar, "aclImdb/test/neg/0_1.txt", b"Awful.")
        add_file(tar, "aclImdb/test/pos/1_10.txt", b"Wonderful.")
        if extra:
            extra(tar)
    return path


def test_imdb_archive_splits(tmp_path):
    archive = write_imdb_archive(tmp_path / "imdb.tar.gz")
    splits = load_imdb(archive, tmp_path / "cache")
    assert len(splits["train"]) == 3
    assert len(splits["test"]) == 2
    assert splits["train"].labels.tolist() == [0, 1, 1]  # sorted by member: neg/1_2, pos/0_9, pos/2_8
    assert splits["train"].texts[2] == "Caf\u00e9 scene was superb"
    assert splits["test"].origins[0] == "imdb.tar.gz:aclImdb/test/neg/0_1.txt"


def test_imdb_cache_reused(tmp_path):
    archive = write_imdb_archive(tmp_path / "imdb.tar.gz")
    load_imdb(archive, tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("imdb_*.jsonl.gz"))
    assert len(cached) == 1
    first = load_imdb(archive, tmp_path / "cache")
    assert first["train"].texts[1] == "Great film.<br /><br />Loved it"


def test_imdb_rejects_parent_path(tmp_path):
    archive = write_imdb_archive(tmp_path / "evil.tar.gz", lambda tar: add_file(tar, "../evil", b"x"))
    with pytest.raises(DataError, match=r"member '\.\./evil' has a '\.\.' component"):
        load_imdb(archive, tmp_path / "cache")
    assert not (tmp_path / "evil").exists()
    assert not list((tmp_path / "cache").glob("imdb_*"))


def test_imdb_rejects_nested_parent_path(tmp_path):
    archive = write_imdb_archive(tmp_path / "evil.tar.gz",
                                 lambda tar: add_file(tar, "aclImdb/train/../../../evil.txt", b"x"))
    with pytest.raises(DataError, match="evil.txt"):
        list(iter_imdb_reviews(archive))


def test_imdb_rejects_absolute_path(tmp_path):
    archive = write_imdb_archive(tmp_path / "abs.tar.gz", lambda tar: add_file(tar, "/tmp/evil", b"x"))
    with pytest.raises(DataError, match="absolute path"):
        list(iter_imdb_reviews(archive))


def test_imdb_rejects_symlink(tmp_path):
    def add_link(tar):
        info = tarfile.TarInfo("aclImdb/train/pos/3_9.txt")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)

    archive = write_imdb_archive(tmp_path / "link.tar.gz", add_link)
    with pytest.raises(DataError, match=r"3_9\.txt.*link"):
        list(iter_imdb_reviews(archive))


def test_imdb_rejects_bad_utf8(tmp_path):
    archive = write_imdb_archive(tmp_path / "bad.tar.gz",
                                 lambda tar: add_file(tar, "aclImdb/train/neg/4_1.txt", b"fine\nbad \xff byte"))
    with pytest.raises(DataError, match=r"4_1\.txt: line 2: invalid UTF-8 byte 0xff"):
        list(iter_imdb_reviews(archive))


def test_imdb_rejects_empty_review(tmp_path):
    archive = write_imdb_archive(tmp_path / "empty.tar.gz",
                                 lambda tar: add_file(tar, "aclImdb/train/neg/5_1.txt", b"  \n"))
    with pytest.raises(DataError, match=r"5_1\.txt: line 1: the review is empty"):
        list(iter_imdb_reviews(archive))


def test_sst_labels_and_origins(tmp_path):
    path = tmp_path / "stsa.fine.train"
    path.write_bytes(b"4 a gem .\n0 a mess .\n2 it exists .\n")
    data = load_sst(path, ("vneg", "neg", "neu", "pos", "vpos"))
    assert data.labels.tolist() == [4, 0, 2]
    assert data.texts[0] == "a gem ."
    assert data.origins[2] == "stsa.fine.train:3"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"1 good .\n2 odd label .\n", r"line 2: label '2' is not one of 0\.\.1"),
        (b"1 good .\n0 \n", r"line 2: the text is empty"),
        (b"1 good .\n0 caf\xe9 .\n", r"line 2: invalid UTF-8 byte 0xe9"),
    ],
)
def test_sst_bad_lines(tmp_path, content, message):
    path = tmp_path / "stsa.binary.train"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_sst(path, ("negative", "positive"))


def test_csv_label_names_from_file(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"good, really",pos\nbad,neg\nmeh,neutral\n', encoding="utf-8")
    data = load_label_table(path, "text", "label")
    assert data.label_names == ("neg", "neutral", "pos")
    assert data.labels.tolist() == [2, 0, 1]
    assert data.texts[0] == "good, really"


def test_tsv_numeric_labels_sorted(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("label\ttext\n10\tgreat\n2\tpoor\n1\tawful\n", encoding="utf-8")
    data = load_label_table(path, "text", "label")
    assert data.label_names == ("1", "2", "10")


def test_csv_unknown_test_label(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("text,label\nfine,pos\nodd,maybe\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.csv: line 3: label 'maybe' is not in the label set"):
        load_label_table(path, "text", "label", ("neg", "pos"))


def test_csv_empty_text(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,pos\n   ,neg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv: line 3: the text is empty"):
        load_label_table(path, "text", "label")


def test_csv_bad_utf8_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,pos\nfine,neg\ncaf\xe9,neg\n")
    with pytest.raises(DataError, match=r"train\.csv: line 4: invalid UTF-8"):
        load_label_table(path, "text", "label")


def test_csv_missing_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("review,label\nfine,pos\n", encoding="utf-8")
    with pytest.raises(DataError, match="no column 'text'"):
        load_label_table(path, "text", "label")


def test_csv_config_needs_file():
    with pytest.raises(ConfigError, match="data.train_file"):
        DataConfig(dataset="csv")


def test_split_reproducible():
    labels = np.array([0] * 30 + [1] * 10)
    first = split_stratified(labels, 0.2, seed=7)
    second = split_stratified(labels, 0.2, seed=7)
    assert first[1].tolist() == second[1].tolist()
    assert first[0].tolist() == second[0].tolist()


def test_split_stratified_counts():
    labels = np.array([0] * 30 + [1] * 10)
    train, validation = split_stratified(labels, 0.2, seed=7)
    assert np.bincount(labels[validation]).tolist() == [6, 2]
    assert len(train) == 32
    assert set(train.tolist()).isdisjoint(validation.tolist())


def test_split_depends_on_seed():
    labels = np.array([0] * 50 + [1] * 50)
    assert split_stratified(labels, 0.2, 1)[1].tolist() != split_stratified(labels, 0.2, 2)[1].tolist()


def test_split_keeps_rare_label_in_train():
    labels = np.array([0] * 20 + [1] * 2)
    train, validation = split_stratified(labels, 0.1, seed=0)
    assert np.bincount(labels[validation], minlength=2).tolist() == [2, 1]
    assert np.bincount(labels[train], minlength=2).tolist() == [18, 1]


def test_load_splits_sst_carves_validation(tmp_path):
    folder = tmp_path / "sentiment" / "sst"
    folder.mkdir(parents=True)
    rows = "".join(f"{i % 2} sentence number {i} .\n" for i in range(40))
    for split in ("train", "dev", "test"):
        (folder / f"stsa.binary.{split}").write_text(rows, encoding="utf-8")
    splits = load_splits(DataConfig(dataset="sst2", validation_fraction=0.25), tmp_path, seed=3)
    assert len(splits["validation"]) == 10
    assert len(splits["train"]) == 30
    assert sorted(splits) == ["dev", "test", "train", "validation"]


def test_sentence_split_keeps_labels():
    data = LabeledTexts(
        ["A truly great film from start to end. 10/10! Would I watch it again? Yes, many more times.<br />"
         "The cast is wonderful in every role", "Dull, slow and far too long overall."],
        np.array([1, 0]), ("negative", "positive"), ["a.txt", "b.txt"],
    )
    sentences = split_into_sentences(data)
    assert sentences.texts == ["A truly great film from start to end.", "Would I watch it again?",
                               "Yes, many more times.", "The cast is wonderful in every role",
                               "Dull, slow and far too long overall."]
    assert sentences.labels.tolist() == [1, 1, 1, 1, 0]
    assert sentences.origins == ["a.txt#1", "a.txt#3", "a.txt#4", "a.txt#5", "b.txt#1"]


def test_sentence_split_without_sentences():
    data = LabeledTexts(["Bad.", "Great!"], np.array([0, 1]), ("negative", "positive"), ["a.txt", "b.txt"])
    with pytest.raises(DataError, match=r"None of the 2 texts \(the first is a.txt\) has a sentence of 4 to 60 words"):
        split_into_sentences(data)


def test_imdb_sentences_split_by_review(tmp_path):
    folder = tmp_path / "sentiment" / "imdb"
    folder.mkdir(parents=True)

    def reviews(tar):
        for i in range(20):
            text = f"Review {i} opens with this sentence. Review {i} closes with another sentence."
            add_file(tar, f"aclImdb/train/{'pos' if i % 2 else 'neg'}/{i + 10}_5.txt", text.encode())
        add_file(tar, "aclImdb/test/pos/9_9.txt", b"A test review with one long sentence.")

    write_imdb_archive(folder / "aclImdb_train_test.tar.gz", extra=reviews)
    config = DataConfig(dataset="imdb_sentences", validation_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    splits = load_splits(config, tmp_path, seed=0)
    reviews_of = {name: {origin.split("#")[0] for origin in data.origins} for name, data in splits.items()}
    assert not reviews_of["train"] & reviews_of["validation"]
    # 2 of the 11 negative and 2 of the 12 positive reviews; seed 0 picks 4 that have sentences.
    assert len(reviews_of["validation"]) == 4
    assert all(text.count(".") <= 1 for text in splits["train"].texts)
    assert splits["test"].texts == ["A test review with one long sentence."]


def test_load_splits_sst_validates_on_dev(tmp_path):
    folder = tmp_path / "sentiment" / "sst"
    folder.mkdir(parents=True)
    for split, count in (("train", 40), ("dev", 6), ("test", 8)):
        rows = "".join(f"{i % 2} {split} sentence {i} .\n" for i in range(count))
        (folder / f"stsa.binary.{split}").write_text(rows, encoding="utf-8")
    splits = load_splits(DataConfig(dataset="sst2", validation_from="dev"), tmp_path, seed=3)
    assert len(splits["train"]) == 40
    assert splits["validation"].texts == splits["dev"].texts
    assert splits["validation"].texts[0] == "dev sentence 0 ."


def test_validation_from_dev_needs_dev():
    with pytest.raises(ConfigError, match="data.validation_from is 'dev' but data.dataset 'imdb' has no dev split"):
        DataConfig(dataset="imdb", validation_from="dev")


@pytest.mark.parametrize(
    ("truncation", "expected"),
    [
        ("head", [1, 2, 3, 4]),
        ("tail", [7, 8, 9, 10]),
        ("head_tail", [1, 8, 9, 10]),
    ],
)
def test_truncation_keeps(truncation, expected):
    assert truncate_ids(range(1, 11), 4, truncation, head_fraction=0.25) == expected


def test_truncation_head_tail_half():
    assert truncate_ids(range(1, 11), 6, "head_tail", head_fraction=0.5) == [1, 2, 3, 8, 9, 10]


def test_truncation_short_unchanged():
    assert truncate_ids([5, 6], 4, "head_tail", head_fraction=0.25) == [5, 6]


def test_clean_text_html_and_case():
    config = DataConfig(strip_html=True, lowercase=True)
    assert clean_text("Good<br /><BR>Film", config) == "good  film"


def test_class_weights_balanced_off():
    assert compute_class_weights(np.array([0, 0, 1, 1]), 2, "auto", 1.5) is None


def test_class_weights_imbalanced():
    weights = compute_class_weights(np.array([0, 0, 0, 1]), 2, "auto", 1.5)
    np.testing.assert_allclose(weights, [4 / 6, 2.0])  # n / (k * count)


def test_class_weights_missing_class():
    with pytest.raises(DataError, match="every class"):
        compute_class_weights(np.array([0, 0]), 2, "on", 1.5)


def test_input_lines_empty_line(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("good\n\nbad\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: the text is empty"):
        read_input_lines(str(path))


def test_input_lines_numbers(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("good\nbad\n", encoding="utf-8")
    assert read_input_lines(str(path))[1] == [(1, "good"), (2, "bad")]


def test_input_lines_gzipped(tmp_path):
    path = tmp_path / "inputs.txt.gz"
    path.write_bytes(gzip.compress("good\nbad\n".encode("utf-8")))
    assert read_input_lines(str(path))[1] == [(1, "good"), (2, "bad")]


def test_input_lines_bad_gzip(tmp_path):
    path = tmp_path / "inputs.txt.gz"
    path.write_bytes(b"good\n")
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_input_lines(str(path))
