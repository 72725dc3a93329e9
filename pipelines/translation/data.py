"""Sentence pairs for translation: loading Multi30k, Anki TSV or user files, tokenizers and batches.

Conventions:

* A split is a list of source sentences and a list of target sentences of equal length,
  aligned by index. No sentence is empty, because ``shared.text`` rejects empty lines and
  names the file and line.
* Token sequences end with EOS and carry no BOS, except the decoder input, which is
  ``[BOS] + target`` while the label is ``target + [EOS]``. Padding is on the right with
  ``PAD_ID = 0``.
* Tokenizers are trained on the training split only and saved in the run directory under
  ``tokenizers/``, each with its sha256, which is checked on every load.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines.translation.config import TranslationConfig, TranslationDataConfig
from shared.datafiles import RemoteFile, ensure_files
from shared.errors import ConfigError, DataError
from shared.padding import PAD_ID, make_bucketed_dataset, padding_fraction
from shared.text import (
    BOS_ID,
    SentencePieceTokenizer,
    load_sentencepiece,
    read_lines,
    read_parallel_lines,
    train_sentencepiece,
)

logger = logging.getLogger(__name__)

MULTI30K_DIR = "translation/multi30k"
MULTI30K_SPLITS = (
    "train",
    "val",
    "test_2016_flickr",
    "test_2017_flickr",
    "test_2018_flickr",
    "test_2017_mscoco",
)
MULTI30K_TEST_SPLIT = "test_2016_flickr"
MULTI30K_URL = (
    "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/"
    "data/task1/raw/{name}"
)
# sha256 of the gzipped files as published in the repository above.
MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2017_flickr.en.gz": "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074",
    "test_2017_flickr.de.gz": "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee",
    "test_2017_flickr.fr.gz": "3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496",
    "test_2018_flickr.en.gz": "ef4f4844037d4c5dea75c9a8ed5fd78905967a26f67c255e230cc9780032654d",
    "test_2018_flickr.de.gz": "ddd0130c7d97482dc5197a02141dae8dd79f20f03586c480d675c09a32daf608",
    "test_2018_flickr.fr.gz": "fb2b83fcceb937a4f7e3e93c1c51c22aba92f1e342391e6b5ba392b16a920501",
    "test_2017_mscoco.en.gz": "aab300bfb4427697987e02cd0aacd44bfe8aa50456231b6474c08038bbed2b58",
    "test_2017_mscoco.de.gz": "799e4854c25d601cb6cb6be29eabe5667734c61ace2f495e03e429031a0bc338",
    "test_2017_mscoco.fr.gz": "754f3072ba9f124569ba5258b32730fc1d214bbf8e0c6dfb2b74401676220db0",
}
ANKI_DIR = "translation/anki"
ANKI_FILES = {"es": "spa-eng_spa.txt.gz", "fr": "fra-eng_fra.txt.gz", "ja": "jpn-eng_jpn.txt.gz"}
SHUFFLED_SPLITS = ("train", "val", "test")
# The split of a shuffled corpus must not move when the training seed changes.
SPLIT_SEED = 20240601
TOKENIZER_DIR = "tokenizers"


@dataclasses.dataclass(frozen=True)
class ParallelSplit:
    """Aligned source and target sentences of one split, with a label for logs and errors."""

    name: str
    source: list[str]
    target: list[str]

    def __len__(self) -> int:
        return len(self.source)


@dataclasses.dataclass(frozen=True)
class Tokenizers:
    """The source and target SentencePiece tokenizers (the same object when joint)."""

    source: SentencePieceTokenizer
    target: SentencePieceTokenizer


# ---------------------------------------------------------------------------
# Reading splits.


def list_splits(config: TranslationDataConfig) -> tuple[str, ...]:
    """Return the split names that ``config.dataset`` provides."""
    return MULTI30K_SPLITS if config.dataset == "multi30k" else SHUFFLED_SPLITS


def default_test_split(config: TranslationDataConfig) -> str:
    """Return the split ``evaluate`` scores by default."""
    return MULTI30K_TEST_SPLIT if config.dataset == "multi30k" else "test"


def load_split(config: TranslationDataConfig, data_dir: str | Path, split: str) -> ParallelSplit:
    """Load one split as aligned sentence lists.

    Args:
        config: the data section (dataset, languages, paths).
        data_dir: the data root that contains ``translation/...``.
        split: a name from `list_splits`.

    Returns:
        The split's sentences, source and target aligned.

    Raises:
        ConfigError: ``split`` is not a split of this dataset.
        DataError: a file is missing, not UTF-8, has an empty line, or the pair is misaligned.
    """
    splits = list_splits(config)
    if split not in splits:
        raise ConfigError(
            f"--split {split!r} is not a split of the {config.dataset} dataset; "
            f"use one of {list(splits)}."
        )
    if config.dataset == "multi30k":
        source, target = load_multi30k_split(config, data_dir, split)
    else:
        pairs = load_shuffled_splits(config, data_dir)
        source, target = pairs[split]
    if split == "train" and config.max_examples is not None and len(source) > config.max_examples:
        logger.warning(
            "Using the first %d of %d training pairs (data.max_examples).",
            config.max_examples,
            len(source),
        )
        source, target = source[: config.max_examples], target[: config.max_examples]
    logger.info(
        "Split %s: %d sentence pairs (%s -> %s)",
        split,
        len(source),
        config.source_language,
        config.target_language,
    )
    return ParallelSplit(split, source, target)


def list_multi30k_files(config: TranslationDataConfig) -> list[RemoteFile]:
    """Return every Multi30k file of the configured language pair, with its URL and sha256."""
    files = []
    for split in MULTI30K_SPLITS:
        for language in (config.source_language, config.target_language):
            name = f"{split}.{language}.gz"
            files.append(
                RemoteFile(
                    f"{MULTI30K_DIR}/{name}", MULTI30K_URL.format(name=name), MULTI30K_SHA256[name]
                )
            )
    return files


def load_multi30k_split(
    config: TranslationDataConfig, data_dir: str | Path, split: str
) -> tuple[list[str], list[str]]:
    """Read one Multi30k split of the configured pair, checking that all files of the pair exist."""
    paths = ensure_files("Multi30k", list_multi30k_files(config), data_dir)
    source_path = paths[f"{MULTI30K_DIR}/{split}.{config.source_language}.gz"]
    target_path = paths[f"{MULTI30K_DIR}/{split}.{config.target_language}.gz"]
    return read_parallel_lines(source_path, target_path, f"{split} source", f"{split} target")


def load_shuffled_splits(
    config: TranslationDataConfig, data_dir: str | Path
) -> dict[str, tuple[list[str], list[str]]]:
    """Load an Anki TSV file or user files and return train, val and test pairs."""
    if config.dataset == "anki":
        source, target = load_anki_pairs(config, data_dir)
        return split_pairs(source, target, config.val_fraction, config.test_fraction)
    source, target = read_parallel_lines(
        config.train_source, config.train_target, "train source", "train target"
    )
    if config.val_source and config.val_target:
        splits = {
            "train": (source, target),
            "val": read_parallel_lines(
                config.val_source, config.val_target, "val source", "val target"
            ),
        }
    else:
        logger.warning(
            "No data.val_source/val_target given: holding out %.0f%% of the training pairs for "
            "validation.",
            100 * config.val_fraction,
        )
        splits = split_pairs(source, target, config.val_fraction, 0.0)
    if config.test_source and config.test_target:
        splits["test"] = read_parallel_lines(
            config.test_source, config.test_target, "test source", "test target"
        )
    elif "test" not in splits or not splits["test"][0]:
        splits["test"] = splits["val"]
        logger.warning(
            "No data.test_source/test_target given: the test split is the validation split."
        )
    return splits


def resolve_anki_path(config: TranslationDataConfig, data_dir: str | Path) -> Path:
    """Return the TSV file to read: ``data.anki_path`` if set, else the Anki file of the pair."""
    if config.anki_path:
        path = Path(config.anki_path)
        return path if path.is_absolute() else Path(data_dir) / path
    other = config.target_language if config.source_language == "en" else config.source_language
    relative = f"{ANKI_DIR}/{ANKI_FILES[other]}"
    return ensure_files("Anki sentence pairs", [RemoteFile(relative)], data_dir)[relative]


def load_anki_pairs(
    config: TranslationDataConfig, data_dir: str | Path
) -> tuple[list[str], list[str]]:
    """Read a tab-separated pair file (English, other language, optional extra columns)."""
    path = resolve_anki_path(config, data_dir)
    english, other = parse_tsv_pairs(read_lines(path, "sentence pairs"), path)
    if config.source_language == "en":
        return english, other
    return other, english


def parse_tsv_pairs(lines: Sequence[str], path: str | Path) -> tuple[list[str], list[str]]:
    """Split each line at tabs into its first two columns.

    Raises:
        DataError: a line has fewer than two columns or an empty sentence, naming file and line.
    """
    first, second = [], []
    for line_number, line in enumerate(lines, start=1):
        columns = line.split("\t")
        if len(columns) < 2 or not columns[0].strip() or not columns[1].strip():
            raise DataError(
                f"{path}: line {line_number}: expected two non-empty tab-separated sentences "
                f"(English first), got {line[:80]!r}. Fix or remove the line."
            )
        first.append(columns[0])
        second.append(columns[1])
    return first, second


def split_pairs(
    source: list[str], target: list[str], val_fraction: float, test_fraction: float
) -> dict[str, tuple[list[str], list[str]]]:
    """Shuffle pairs with a fixed seed and cut them into train, val and test.

    Raises:
        DataError: fewer pairs than needed for a non-empty training and validation split.
    """
    order = list(range(len(source)))
    random.Random(SPLIT_SEED).shuffle(order)
    num_val = max(1, round(len(order) * val_fraction))
    num_test = round(len(order) * test_fraction)
    if len(order) - num_val - num_test < 1:
        raise DataError(
            f"Only {len(order)} sentence pairs: too few to split into train, validation and test. "
            "Provide more pairs or lower data.val_fraction and data.test_fraction."
        )
    parts = {
        "val": order[:num_val],
        "test": order[num_val : num_val + num_test],
        "train": order[num_val + num_test :],
    }
    return {
        name: ([source[i] for i in idx], [target[i] for i in idx]) for name, idx in parts.items()
    }


# ---------------------------------------------------------------------------
# Tokenizers.


def resolve_normalization(config: TranslationDataConfig, language: str) -> str:
    """Return the SentencePiece normalization for ``language``.

    ``auto`` keeps Japanese text exact (``identity``), because NFKC rewrites full-width
    punctuation and half-width katakana, and uses ``nmt_nfkc`` for other languages.
    """
    if config.normalization != "auto":
        return config.normalization
    return "identity" if language == "ja" else "nmt_nfkc"


def train_tokenizers(
    config: TranslationDataConfig, train: ParallelSplit, run_dir: str | Path, seed: int
) -> Tokenizers:
    """Train SentencePiece on the training split only, jointly or one model per side."""
    model_dir = Path(run_dir) / TOKENIZER_DIR
    options = {"model_type": config.tokenizer_type, "seed": seed}
    if config.joint_vocabulary:
        normalization = resolve_normalization(config, config.target_language)
        model = train_sentencepiece(
            [*train.source, *train.target],
            model_dir,
            config.target_vocab_size,
            name="joint",
            normalization=normalization,
            **options,
        )
        logger.info("Trained joint tokenizer %s (%d pieces)", model.path, model.vocab_size)
        joint = load_sentencepiece(model.path)
        return Tokenizers(joint, joint)
    loaded = []
    for side, sentences, size, language in (
        ("source", train.source, config.source_vocab_size, config.source_language),
        ("target", train.target, config.target_vocab_size, config.target_language),
    ):
        model = train_sentencepiece(
            sentences,
            model_dir,
            size,
            name=side,
            normalization=resolve_normalization(config, language),
            **options,
        )
        logger.info("Trained %s tokenizer %s (%d pieces)", side, model.path, model.vocab_size)
        loaded.append(load_sentencepiece(model.path))
    return Tokenizers(*loaded)


def tokenizer_paths(config: TranslationDataConfig, run_dir: str | Path) -> tuple[Path, Path]:
    """Return the source and target tokenizer model files inside ``run_dir``."""
    model_dir = Path(run_dir) / TOKENIZER_DIR
    if config.joint_vocabulary:
        return model_dir / "joint.model", model_dir / "joint.model"
    return model_dir / "source.model", model_dir / "target.model"


def load_tokenizers(config: TranslationDataConfig, run_dir: str | Path) -> Tokenizers:
    """Load the tokenizers saved by `train_tokenizers`, checking their sha256."""
    source_path, target_path = tokenizer_paths(config, run_dir)
    source = load_sentencepiece(source_path)
    target = source if target_path == source_path else load_sentencepiece(target_path)
    return Tokenizers(source, target)


# ---------------------------------------------------------------------------
# Token ids and batches.


def encode_sources(tokenizer: SentencePieceTokenizer, sentences: Sequence[str]) -> list[list[int]]:
    """Encode source sentences as token ids ending with EOS."""
    return tokenizer.encode(sentences, add_eos=True)


def encode_pairs(
    tokenizers: Tokenizers, split: ParallelSplit, max_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Encode a split and drop pairs whose source or target exceeds ``max_tokens`` (EOS included).

    Returns:
        Source ids and target ids (each ending with EOS) of the kept pairs.
    """
    source_ids = encode_sources(tokenizers.source, split.source)
    target_ids = tokenizers.target.encode(split.target, add_eos=True)
    kept = [
        i
        for i in range(len(source_ids))
        if len(source_ids[i]) <= max_tokens and len(target_ids[i]) <= max_tokens
    ]
    dropped = len(source_ids) - len(kept)
    if dropped:
        logger.warning(
            "Split %s: dropped %d of %d pairs longer than data.max_tokens=%d tokens.",
            split.name,
            dropped,
            len(source_ids),
            max_tokens,
        )
    source_ids = [source_ids[i] for i in kept]
    target_ids = [target_ids[i] for i in kept]
    log_length_summary(split.name, source_ids, target_ids)
    return source_ids, target_ids


def log_length_summary(
    name: str, source_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]
) -> None:
    """Log token length percentiles of both sides of a split."""
    if not source_ids:
        return
    for side, rows in (("source", source_ids), ("target", target_ids)):
        lengths = np.asarray([len(r) for r in rows])
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        logger.info(
            "Split %s %s tokens: mean %.1f, p50 %d, p90 %d, p99 %d, max %d. "
            "Padding to the max would waste "
            "%.0f%%",
            name,
            side,
            lengths.mean(),
            p50,
            p90,
            p99,
            lengths.max(),
            100 * padding_fraction(lengths),
        )


def make_pair_dataset(
    source_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    batch_size: int,
    boundaries: Sequence[int],
    *,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Build length-bucketed batches of ``({source_ids, target_input_ids}, target_output_ids)``.

    The decoder input is ``[BOS] + target`` without the final EOS and the label is the
    target with EOS (teacher forcing). Batches group pairs of similar length, so little
    of each batch is padding.
    """

    def generate():
        for source, target in zip(source_ids, target_ids, strict=True):
            yield source, [BOS_ID, *target[:-1]], target

    spec = tf.TensorSpec(shape=(None,), dtype=tf.int32)
    dataset = tf.data.Dataset.from_generator(generate, output_signature=(spec, spec, spec))
    dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(len(source_ids), seed=seed, reshuffle_each_iteration=True)
    dataset = make_bucketed_dataset(
        dataset,
        lambda source, target_in, target_out: tf.maximum(
            tf.shape(source)[0], tf.shape(target_in)[0]
        ),
        batch_size,
        boundaries,
        padding_values=(PAD_ID, PAD_ID, PAD_ID),
    )
    dataset = dataset.map(
        lambda s, t_in, t_out: ({"source_ids": s, "target_input_ids": t_in}, t_out)
    )
    if shuffle:
        dataset = dataset.shuffle(64, seed=seed + 1, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    return dataset.prefetch(tf.data.AUTOTUNE)


def compute_log_unigram(rows: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Return the log relative frequency of each id in ``rows``, add-one smoothed, as float32."""
    counts = np.bincount(
        np.concatenate([np.asarray(r, np.int64) for r in rows]), minlength=vocab_size
    )
    counts = counts[:vocab_size].astype(np.float64) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def count_tokens(rows: Sequence[Sequence[int]]) -> int:
    """Return the number of tokens in all rows."""
    return int(sum(len(r) for r in rows))


def make_datasets(
    config: TranslationConfig,
    tokenizers: Tokenizers,
    train: ParallelSplit,
    val: ParallelSplit,
    batch_size: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, dict]:
    """Encode train and val, and return their batched datasets and counts for logs and metrics."""
    batch_size = batch_size or config.train.batch_size
    train_src, train_tgt = encode_pairs(tokenizers, train, config.data.max_tokens)
    val_src, val_tgt = encode_pairs(tokenizers, val, config.data.max_tokens)
    if not train_src or not val_src:
        raise DataError(
            f"No pairs left after filtering at data.max_tokens={config.data.max_tokens} "
            f"(train {len(train_src)}, val {len(val_src)}). Raise data.max_tokens."
        )
    boundaries = config.data.bucket_boundaries
    train_ds = make_pair_dataset(
        train_src,
        train_tgt,
        batch_size,
        boundaries,
        shuffle=True,
        seed=config.train.seed,
        repeat=config.train.steps_per_epoch is not None,
    )
    val_ds = make_pair_dataset(
        val_src, val_tgt, batch_size, boundaries, repeat=config.train.validation_steps is not None
    )
    counts = {
        "train_pairs": len(train_src),
        "val_pairs": len(val_src),
        "train_target_tokens": count_tokens(train_tgt),
        "train_source_tokens": count_tokens(train_src),
        "target_log_unigram": compute_log_unigram(train_tgt, tokenizers.target.vocab_size),
    }
    return train_ds, val_ds, counts
