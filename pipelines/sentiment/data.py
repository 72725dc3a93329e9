"""Sentiment data: IMDB archive, SST files and user CSV/TSV, stratified splits, truncation, batches.

Conventions this module owns:

* A labelled split is a `LabeledTexts`: texts, integer labels indexing ``label_names``,
  and for each text its origin (``file:line`` or ``archive:member``) for error messages.
* The IMDB archive is read member by member with `tarfile`, without extracting anything.
  Absolute paths, ``..`` components, links and device files are rejected with the member
  named. The parsed reviews are cached once per archive sha256 as gzipped JSON lines.
* The validation split is carved from the training split, stratified by label, with a
  seeded generator, or for SST is its own dev file (``data.validation_from=dev``). The
  test split is never used for early stopping or tuning.
* Texts longer than ``data.max_length`` tokens are truncated after tokenization, keeping
  the head, the tail or both. The number of truncated texts is logged as a WARNING.
* Token ids are padded on the right with ``PAD_ID = 0`` (see ``shared.padding``); every
  text has at least one token.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import posixpath
import re
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines.sentiment.config import DataConfig
from shared.datafiles import RemoteFile, compute_sha256, default_cache_dir, ensure_files
from shared.errors import DataError
from shared.padding import PAD_ID, make_bucketed_dataset, pad_token_ids
from shared.text import SentencePieceTokenizer

logger = logging.getLogger(__name__)

IMDB_ARCHIVE = "sentiment/imdb/aclImdb_train_test.tar.gz"
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "28f11d143950f3330413022cbfc049b7e90fe037113b15245264c3187adc8b20"
IMDB_LABELS = ("negative", "positive")
IMDB_REVIEW = re.compile(r"^aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
CACHE_FORMAT_VERSION = 1

SST_FILES = {"sst2": "sentiment/sst/stsa.binary.{split}", "sst5": "sentiment/sst/stsa.fine.{split}"}
SST_LABELS = {
    "sst2": ("negative", "positive"),
    "sst5": ("very negative", "negative", "neutral", "positive", "very positive"),
}
SST_SPLITS = ("train", "dev", "test")

HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
HTML_BREAK_PATTERN = r"(?i)<br\s*/?>"  # The same pattern in RE2 syntax, for tf.strings.regex_replace.

# ``imdb_sentences`` cuts reviews after ., ! or ? followed by white space, and keeps the
# sentences of SENTENCE_MIN_WORDS to SENTENCE_MAX_WORDS words: shorter ones are mostly
# fragments ("8/10."), longer ones mostly missing punctuation.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SENTENCE_MIN_WORDS = 4
SENTENCE_MAX_WORDS = 60


@dataclasses.dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer labels into ``label_names`` and the origin of each text."""

    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    origins: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabeledTexts:
        """Return the examples at ``indices`` in that order."""
        return LabeledTexts(
            [self.texts[i] for i in indices],
            self.labels[np.asarray(indices, dtype=np.int64)],
            self.label_names,
            [self.origins[i] for i in indices],
        )


# ---------------------------------------------------------------------------
# IMDB archive.


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Raise DataError unless ``member`` is a directory or regular file whose path stays inside.

    Raises:
        DataError: the member is a link or device, or its name is absolute or climbs out
            of the archive root with ``..``.
    """
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{archive}: member {name!r} has an absolute path; the archive is unsafe and was not read.")
    if ".." in re.split(r"[/\\]", name):
        raise DataError(
            f"{archive}: member {name!r} has a '..' component that can point outside the archive "
            "root; the archive is unsafe and was not read."
        )
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive}: member {name!r} is a link or special file; only regular files and "
            "folders are accepted. Use an archive without links."
        )


def iter_imdb_reviews(archive: Path) -> Iterator[tuple[str, int, str, str]]:
    """Yield ``(split, label, text, member name)`` for each review in the aclImdb archive.

    Raises:
        DataError: an unsafe member (see `check_member`), a review that is not UTF-8, an
            empty review, or an archive that gzip or tar cannot read.
    """
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                check_member(member, archive)
                match = IMDB_REVIEW.match(posixpath.normpath(member.name))
                if not member.isfile() or match is None:
                    continue
                text = decode_review(tar.extractfile(member).read(), archive, member.name)
                label = IMDB_LABELS.index("positive" if match.group(2) == "pos" else "negative")
                yield match.group(1), label, text, member.name
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive}: not a readable .tar.gz archive ({error}). Download it again.") from error


def decode_review(raw: bytes, archive: Path, member: str) -> str:
    """Decode one review as UTF-8, raising DataError naming the member and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{archive}: member {member}: line {line}: invalid UTF-8 byte 0x{raw[error.start]:02x}. "
            "Convert the review to UTF-8."
        ) from error
    if not text.strip():
        raise DataError(f"{archive}: member {member}: line 1: the review is empty; remove it or fill it in.")
    return text


def load_imdb(archive: Path, cache_dir: Path) -> dict[str, LabeledTexts]:
    """Return the IMDB train and test splits, parsing the archive once and caching the result.

    The cache file name carries the archive's sha256, so a changed archive is parsed again.
    """
    cache_path = cache_dir / f"imdb_{compute_sha256(archive)[:16]}_v{CACHE_FORMAT_VERSION}.jsonl.gz"
    if cache_path.is_file():
        logger.info("Reading parsed IMDB reviews from the cache %s", cache_path)
        records = read_cache(cache_path)
    else:
        logger.info("Parsing %s (one pass over every member; cached afterwards)", archive)
        records = sorted(iter_imdb_reviews(archive), key=lambda record: record[3])
        write_cache(cache_path, records)
        logger.info("Wrote the parsed reviews to %s", cache_path)
    splits = {}
    for split in ("train", "test"):
        chosen = [r for r in records if r[0] == split]
        if not chosen:
            raise DataError(f"{archive}: no reviews under aclImdb/{split}/pos or aclImdb/{split}/neg.")
        splits[split] = LabeledTexts(
            [r[2] for r in chosen], np.asarray([r[1] for r in chosen], dtype=np.int32), IMDB_LABELS,
            [f"{archive.name}:{r[3]}" for r in chosen],
        )
    return splits


def write_cache(path: Path, records: Sequence[tuple[str, int, str, str]]) -> None:
    """Write records as gzipped JSON lines through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_cache(path: Path) -> list[tuple[str, int, str, str]]:
    """Read records written by `write_cache`."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [tuple(json.loads(line)) for line in handle]


# ---------------------------------------------------------------------------
# SST and the user's CSV/TSV files.


def load_sst(path: Path, label_names: Sequence[str]) -> LabeledTexts:
    """Read an SST sentence file: one ``<label> <sentence>`` per line, labels 0..K-1.

    Raises:
        DataError: a non-UTF-8 line, a missing or unknown label, or an empty sentence,
            naming the file and line.
    """
    texts, labels, origins = [], [], []
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = decode_line(raw, path, line_number)
        label, _, text = line.partition(" ")
        if label not in {str(i) for i in range(len(label_names))}:
            raise DataError(
                f"{path}: line {line_number}: label {label!r} is not one of 0..{len(label_names) - 1}; "
                "each line must be '<label> <sentence>'."
            )
        texts.append(require_text(text, path, line_number))
        labels.append(int(label))
        origins.append(f"{path.name}:{line_number}")
    return LabeledTexts(texts, np.asarray(labels, dtype=np.int32), tuple(label_names), origins)


def decode_line(raw: bytes, path: Path, line_number: int) -> str:
    """Decode one line as UTF-8 or raise DataError naming the file and line."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: line {line_number}: invalid UTF-8 byte 0x{raw[error.start]:02x}. Convert the file to UTF-8."
        ) from error


def require_text(text: str, path: Path, line_number: int) -> str:
    """Return ``text`` or raise DataError when it is empty or only whitespace."""
    if not text.strip():
        raise DataError(f"{path}: line {line_number}: the text is empty; remove the line or fill in the text.")
    return text


def read_table_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV (or ``.tsv``) file with a header into ``(line number, row)`` pairs.

    Raises:
        DataError: the file is missing, is not UTF-8 (naming the line), or has no header.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check data.train_file / data.test_file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: invalid UTF-8 byte 0x{raw[error.start]:02x}. Convert the file to UTF-8."
        ) from error
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path}: line 1: no header row; the first line must name the columns.")
    rows = []
    for row in reader:
        rows.append((reader.line_num, row))
    return rows


def load_label_table(
    path: Path, text_column: str, label_column: str, label_names: Sequence[str] | None = None
) -> LabeledTexts:
    """Read the user's table of text and label; label names come from the file when not given.

    Args:
        path: CSV or TSV file with a header row.
        text_column: header of the text column.
        label_column: header of the label column.
        label_names: the label set (from the training file); None reads it from this file,
            sorted (numerically when every label is an integer).

    Raises:
        DataError: a missing column, an empty text or label, or a label outside
            ``label_names``, naming the file and line.
    """
    rows = read_table_rows(path)
    for column in (text_column, label_column):
        if rows and column not in rows[0][1]:
            raise DataError(
                f"{path}: line 1: no column {column!r}; the header has {sorted(rows[0][1])}. "
                "Set data.text_column / data.label_column to the right names."
            )
    if not rows:
        raise DataError(f"{path}: no data rows after the header.")
    raw_labels = [(row.get(label_column) or "").strip() for _, row in rows]
    names = tuple(label_names) if label_names is not None else sort_label_names(set(raw_labels) - {""})
    index = {name: i for i, name in enumerate(names)}
    texts, labels, origins = [], [], []
    for (line_number, row), label in zip(rows, raw_labels):
        if label not in index:
            raise DataError(
                f"{path}: line {line_number}: label {label!r} is not in the label set {list(names)} "
                "read from the training file. Fix the label or add examples of it to the training file."
            )
        texts.append(require_text(row.get(text_column) or "", path, line_number))
        labels.append(index[label])
        origins.append(f"{path.name}:{line_number}")
    return LabeledTexts(texts, np.asarray(labels, dtype=np.int32), names, origins)


def sort_label_names(labels: set[str]) -> tuple[str, ...]:
    """Sort label names, numerically when all of them are integers."""
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


# ---------------------------------------------------------------------------
# Splits.


def split_stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and validation, taking ``fraction`` of every label.

    Each label contributes ``round(fraction * count)`` examples (at least one when it has
    two or more), chosen with a generator seeded by ``seed``, so the split repeats.

    Returns:
        ``(train_indices, validation_indices)``, each sorted.
    """
    rng = np.random.default_rng(seed)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        validation.extend(rng.permutation(members)[:count].tolist())
    validation_indices = np.sort(np.asarray(validation, dtype=np.int64))
    train_indices = np.setdiff1d(np.arange(len(labels)), validation_indices)
    return train_indices, validation_indices


def load_splits(config: DataConfig, data_dir: Path, seed: int) -> dict[str, LabeledTexts]:
    """Load the configured dataset as ``train``, ``validation`` and ``test`` (when it has one).

    SST also keeps its ``dev`` file as the ``dev`` split. With ``data.validation_from=dev``
    that split is also the validation split, and the training split stays whole.
    """
    raw = load_raw_splits(config, data_dir)
    if config.validation_from == "dev":
        splits = {"train": raw["train"], "validation": raw["dev"]}
    else:
        train_indices, validation_indices = split_stratified(raw["train"].labels, config.validation_fraction, seed)
        splits = {"train": raw["train"].subset(train_indices), "validation": raw["train"].subset(validation_indices)}
    splits.update({name: data for name, data in raw.items() if name != "train"})
    if config.dataset == "imdb_sentences":
        # Cut after the carve-out, so that no review has sentences on both sides of it.
        splits = {name: split_into_sentences(data) for name, data in splits.items()}
    for name, data in splits.items():
        counts = np.bincount(data.labels, minlength=len(data.label_names))
        logger.info("Split %s: %d texts; per label %s", name, len(data),
                    dict(zip(data.label_names, counts.tolist())))
    return splits


def load_raw_splits(config: DataConfig, data_dir: Path) -> dict[str, LabeledTexts]:
    """Load the dataset's own splits before the validation carve-out."""
    if config.dataset in ("imdb", "imdb_sentences"):
        paths = ensure_files("IMDB", [RemoteFile(IMDB_ARCHIVE)], data_dir, download=False)
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir() / "sentiment"
        return load_imdb(paths[IMDB_ARCHIVE], cache_dir)
    if config.dataset in SST_FILES:
        pattern = SST_FILES[config.dataset]
        paths = ensure_files(config.dataset.upper(), [RemoteFile(pattern.format(split=s)) for s in SST_SPLITS],
                             data_dir, download=False)
        return {split: load_sst(paths[pattern.format(split=split)], SST_LABELS[config.dataset])
                for split in SST_SPLITS}
    train = load_label_table(Path(config.train_file), config.text_column, config.label_column)
    splits = {"train": train}
    if config.test_file:
        splits["test"] = load_label_table(Path(config.test_file), config.text_column, config.label_column,
                                          train.label_names)
    return splits


def split_into_sentences(data: LabeledTexts) -> LabeledTexts:
    """Cut every text into sentences that keep the text's label (distant supervision).

    HTML line breaks become spaces first. Sentences outside ``SENTENCE_MIN_WORDS`` to
    ``SENTENCE_MAX_WORDS`` words are dropped. The origin of a sentence is its text's
    origin with ``#<sentence number>`` appended (counted from 1 over all pieces).

    Raises:
        DataError: no text yields a sentence of accepted length.
    """
    texts, labels, origins = [], [], []
    for text, label, origin in zip(data.texts, data.labels, data.origins):
        for number, sentence in enumerate(SENTENCE_END.split(HTML_BREAK.sub(" ", text).strip()), start=1):
            if SENTENCE_MIN_WORDS <= len(sentence.split()) <= SENTENCE_MAX_WORDS:
                texts.append(sentence)
                labels.append(label)
                origins.append(f"{origin}#{number}")
    if not texts:
        first = f" (the first is {data.origins[0]})" if data.origins else ""
        raise DataError(f"None of the {len(data)} texts{first} has a sentence of {SENTENCE_MIN_WORDS} to "
                        f"{SENTENCE_MAX_WORDS} words, so imdb_sentences has nothing to train on; it needs "
                        "reviews with punctuated sentences.")
    return LabeledTexts(texts, np.asarray(labels, dtype=np.int32), data.label_names, origins)


# ---------------------------------------------------------------------------
# Text to token ids.


def clean_text(text: str, config: DataConfig) -> str:
    """Apply the configured normalization: HTML line breaks to spaces, lower-casing."""
    if config.strip_html:
        text = HTML_BREAK.sub(" ", text)
    if config.lowercase:
        text = text.lower()
    return text


def truncate_ids(token_ids: Sequence[int], max_length: int, truncation: str, head_fraction: float) -> list[int]:
    """Keep at most ``max_length`` ids: the head, the tail, or ``head_fraction`` head plus tail."""
    token_ids = list(token_ids)
    if len(token_ids) <= max_length:
        return token_ids
    if truncation == "head":
        return token_ids[:max_length]
    if truncation == "tail":
        return token_ids[-max_length:]
    head = compute_head_length(max_length, head_fraction)
    return token_ids[:head] + token_ids[len(token_ids) - (max_length - head):]


def compute_head_length(max_length: int, head_fraction: float) -> int:
    """Return how many ids ``head_tail`` keeps from the start: at least 1 and at most max_length - 1."""
    return min(max(int(round(max_length * head_fraction)), 1), max_length - 1)


def encode_texts(
    tokenizer: SentencePieceTokenizer, texts: Sequence[str], config: DataConfig, origins: Sequence[str] | None = None
) -> list[list[int]]:
    """Clean, tokenize and truncate texts; log a WARNING with the number truncated.

    Raises:
        DataError: a text yields no tokens, naming its origin.
    """
    encoded = tokenizer.encode([clean_text(text, config) for text in texts])
    truncated = 0
    result = []
    for index, token_ids in enumerate(encoded):
        if not token_ids:
            where = origins[index] if origins else f"text {index + 1}"
            raise DataError(f"{where}: the text has no tokens after cleaning; remove it or fill it in.")
        truncated += len(token_ids) > config.max_length
        result.append(truncate_ids(token_ids, config.max_length, config.truncation, config.head_fraction))
    if truncated:
        logger.warning("Truncated %d of %d texts to data.max_length=%d tokens, keeping the %s.",
                       truncated, len(texts), config.max_length, config.truncation.replace("_", " and "))
    return result


def log_length_summary(name: str, token_ids: Sequence[Sequence[int]], max_length: int) -> None:
    """Log length percentiles and the padding fraction at ``max_length`` for one split."""
    lengths = np.asarray([len(ids) for ids in token_ids])
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    padding = 1.0 - lengths.sum() / (len(lengths) * max_length)
    logger.info("Split %s: token lengths p50 %d, p90 %d, p99 %d, max %d; padding fraction at %d: %.3f",
                name, p50, p90, p99, lengths.max(), max_length, padding)


def make_dataset(
    token_ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    batch_size: int,
    *,
    sample_weights: np.ndarray | None = None,
    shuffle_seed: int | None = None,
    repeat: bool = True,
    max_length: int,
) -> tf.data.Dataset:
    """Batch texts by length bucket, padded on the right; shuffled when seeded.

    A shuffled dataset also repeats without end when ``repeat`` is True.

    Returns:
        A dataset of ``(token_ids, labels)`` or ``(token_ids, labels, sample_weights)``.
    """
    ragged = tf.ragged.constant(list(token_ids), dtype=tf.int32)
    parts = (ragged, tf.constant(labels, tf.int32))
    if sample_weights is not None:
        parts += (tf.constant(sample_weights, tf.float32),)
    dataset = tf.data.Dataset.from_tensor_slices(parts)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
        if repeat:
            dataset = dataset.repeat()
    dataset = dataset.map(lambda ids, *rest: (ids.to_tensor() if isinstance(ids, tf.RaggedTensor) else ids, *rest))
    boundaries = [b for b in (32, 64, 128, 192, 256, 384, 512, 768, 1024) if b < max_length]
    padding_values = (tf.constant(PAD_ID, tf.int32), tf.constant(0, tf.int32))
    if sample_weights is not None:
        padding_values += (tf.constant(0.0, tf.float32),)
    dataset = make_bucketed_dataset(dataset, lambda ids, *rest: tf.shape(ids)[0], batch_size,
                                    boundaries=boundaries or [max_length], padding_values=padding_values)
    return dataset.prefetch(tf.data.AUTOTUNE)


def pad_batch(token_ids: Sequence[Sequence[int]], max_length: int | None = None) -> np.ndarray:
    """Right-pad token ids into an int32 matrix (to ``max_length`` when given)."""
    padded, _ = pad_token_ids(token_ids, max_length=max_length)
    return padded


def compute_class_weights(labels: np.ndarray, num_classes: int, mode: str, imbalance_ratio: float) -> np.ndarray | None:
    """Return per-class loss weights ``n / (k * count)``, or None when they are off.

    ``auto`` turns them on when the largest class count exceeds ``imbalance_ratio`` times
    the smallest.

    Raises:
        DataError: a class has no training example while weights are on.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if mode == "off":
        return None
    if mode == "auto" and counts.max() <= imbalance_ratio * max(counts.min(), 1.0) and counts.min() > 0:
        return None
    if counts.min() == 0:
        raise DataError(
            f"class weights need every class in the training split, got counts {counts.astype(int).tolist()}; "
            "add examples of the missing classes or set model.class_weights=off."
        )
    return (counts.sum() / (num_classes * counts)).astype(np.float32)


def read_maybe_gzipped(path: Path) -> bytes:
    """Return the bytes of ``path``, decompressed when its name ends in ``.gz``.

    Raises:
        DataError: a ``.gz`` file is not valid gzip.
    """
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (gzip.BadGzipFile, EOFError) as error:
        raise DataError(f"{path}: not a valid gzip file ({error}). Compress it again, or drop the .gz "
                        "suffix if it is plain text.") from error


def read_input_lines(path: str) -> tuple[str, list[tuple[int, str]]]:
    """Read texts to classify, one per line, from a file (plain or ``.gz``) or standard input (``-``).

    Returns:
        The source name for messages and ``(line number, text)`` pairs.

    Raises:
        DataError: the file is missing, a line is not UTF-8 or is empty, naming the line.
    """
    source = "standard input" if path == "-" else path
    if path == "-":
        raw = sys.stdin.buffer.read()
    elif Path(path).is_file():
        raw = read_maybe_gzipped(Path(path))
    else:
        raise DataError(f"{path}: input file not found; pass an existing file to --input, or - for standard input.")
    lines = []
    for number, line in enumerate(raw.splitlines(), start=1):
        text = decode_line(line, Path(source), number)
        lines.append((number, require_text(text, Path(source), number)))
    if not lines:
        raise DataError(f"{source}: no text to classify; give one text per line.")
    return source, lines
