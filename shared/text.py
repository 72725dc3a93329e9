"""Text files and SentencePiece tokenizers: strict UTF-8 reading, training and checked loading.

Conventions this module owns:

* Text files are UTF-8, plain or gzip-compressed (``.gz``). Lines end at ``\\n``; only the
  line ending (``\\n`` or ``\\r\\n``) is removed, so inner and trailing spaces are kept. A UTF-8
  byte order mark at the start of a file is removed. Line numbers in errors are 1-based.
* A parallel corpus is two files with one sentence per line and equal line counts. Line *i*
  of the source file translates line *i* of the target file, and no line is empty.
* Token id 0 is padding (``PAD_ID`` from ``shared.padding``). Ids 1, 2 and 3 are the unknown
  token, begin-of-sentence and end-of-sentence in every SentencePiece model trained here.
* Every trained model is written with a ``<name>.sha256`` file holding the model's sha256,
  and loading verifies it, so a tokenizer never changes behind a trained network's back.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from shared.config import check_choice, check_range
from shared.errors import ConfigError, DataError
from shared.padding import PAD_ID

logger = logging.getLogger(__name__)

UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

MODEL_TYPES = ("unigram", "bpe")
# Rule names shipped with sentencepiece 0.2 (its package_data folder) plus the built-in identity.
NORMALIZATION_RULES = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity")
# Two threads keep training from taking every core of a small shared machine.
TRAINING_THREADS = 2
UTF8_BOM = "\ufeff"


# ---------------------------------------------------------------------------
# Reading text files.


def describe_source(path: str | Path, source_name: str | None) -> str:
    """Return the file label used in error messages: the path, with the caller's name if given."""
    return f"{source_name} ({path})" if source_name else str(path)


def open_binary(path: Path, label: str) -> io.BufferedIOBase:
    """Open a plain or ``.gz`` file for binary reading, raising DataError when it is missing."""
    if not path.is_file():
        raise DataError(
            f"{label}: file not found. Check the path, or download the dataset into the data "
            "directory (--data-dir or $PIPELINES_DATA_DIR)."
        )
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def decode_line(raw: bytes, line_number: int, label: str) -> str:
    """Decode one line as UTF-8 and remove its line ending, raising DataError on invalid bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_byte = raw[error.start : error.start + 1].hex()
        raise DataError(
            f"{label}: line {line_number}: invalid UTF-8 byte 0x{bad_byte} at byte "
            f"{error.start + 1} of the line. Convert the file to UTF-8 "
            "(for example with iconv) or remove the line."
        ) from error
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    return text


def read_lines(
    path: str | Path,
    source_name: str | None = None,
    allow_empty: bool = False,
) -> list[str]:
    """Read a UTF-8 text file (plain or ``.gz``) into a list of lines without line endings.

    Args:
        path: file to read; a name ending in ``.gz`` is decompressed.
        source_name: a name for the data (such as ``"train source"``) shown in errors
            next to the path.
        allow_empty: accept empty lines. When False, an empty line raises, because an
            empty sentence would become a row of only padding.

    Returns:
        The lines in file order, with the line ending and a leading byte order mark removed.

    Raises:
        DataError: the file is missing or not valid gzip, a line is not valid UTF-8, or a
            line is empty while ``allow_empty`` is False. The message names the file and the
            1-based line number.
    """
    path = Path(path)
    label = describe_source(path, source_name)
    lines: list[str] = []
    try:
        with open_binary(path, label) as handle:
            for line_number, raw in enumerate(handle, start=1):
                text = decode_line(raw, line_number, label)
                if line_number == 1 and text.startswith(UTF8_BOM):
                    text = text[len(UTF8_BOM) :]
                if not text and not allow_empty:
                    raise DataError(
                        f"{label}: line {line_number} is empty; every line must contain text. "
                        "Remove the empty line or fill it in."
                    )
                lines.append(text)
    except (gzip.BadGzipFile, EOFError) as error:
        raise DataError(
            f"{label}: the file is not valid gzip ({error}). Download it again, or remove "
            "the .gz suffix if it is plain text."
        ) from error
    return lines


def read_parallel_lines(
    source_path: str | Path,
    target_path: str | Path,
    source_name: str | None = None,
    target_name: str | None = None,
) -> tuple[list[str], list[str]]:
    """Read a parallel corpus: two UTF-8 files whose line *i* are translations of each other.

    Args:
        source_path: file of source-language sentences, one per line (plain or ``.gz``).
        target_path: file of target-language sentences, aligned line by line.
        source_name: a name for the source file used in errors.
        target_name: a name for the target file used in errors.

    Returns:
        The source lines and the target lines, equal in number.

    Raises:
        DataError: either file fails ``read_lines`` (empty lines included), or the two
            files have different line counts.
    """
    source_lines = read_lines(source_path, source_name, allow_empty=False)
    target_lines = read_lines(target_path, target_name, allow_empty=False)
    if len(source_lines) != len(target_lines):
        raise DataError(
            f"Parallel files differ in length: {describe_source(source_path, source_name)} has "
            f"{len(source_lines)} lines but {describe_source(target_path, target_name)} has "
            f"{len(target_lines)} lines. Each line must translate the same line of the other "
            "file, so fix the alignment or use the matching pair of files."
        )
    return source_lines, target_lines


# ---------------------------------------------------------------------------
# Writing files atomically.


def compute_bytes_sha256(data: bytes) -> str:
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``.

    The file gets the usual mode (0o666 minus the umask), not the owner-only mode of
    ``tempfile``, so that exported tokenizers can be read by other users and services.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp")
    try:
        tmp_path.write_bytes(data)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    os.replace(tmp_path, path)


# ---------------------------------------------------------------------------
# SentencePiece tokenizer.


class SentencePieceTokenizer:
    """A loaded SentencePiece model with this project's special ids and the model's sha256."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, sha256: str) -> None:
        self.processor = processor
        self.path = path
        self.sha256 = sha256
        self.vocab_size = processor.get_piece_size()
        self.pad_id = processor.pad_id()
        self.unk_id = processor.unk_id()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()

    def encode(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode each text into token ids, optionally framed by BOS and EOS.

        Raises:
            TypeError: ``texts`` is a single string instead of a sequence of strings.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single text as [text].")
        return self.processor.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids into text, stopping at the first EOS and skipping padding and BOS.

        Raises:
            IndexError: an id is outside ``[0, vocab_size)``.
        """
        kept: list[int] = []
        for value in ids:
            token_id = int(value)
            if token_id == self.eos_id:
                break
            if not 0 <= token_id < self.vocab_size:
                raise IndexError(
                    f"Token id {token_id} is outside the vocabulary [0, {self.vocab_size}) of "
                    f"{self.path}; decode ids produced with this tokenizer."
                )
            if token_id not in (self.pad_id, self.bos_id):
                kept.append(token_id)
        return self.processor.decode(kept)

    def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """Decode each row of token ids with ``decode``."""
        return [self.decode(row) for row in rows]


@dataclasses.dataclass(frozen=True)
class SentencePieceModel:
    """Files written by ``train_sentencepiece`` and the facts a pipeline records about them."""

    path: Path
    vocab_path: Path
    sha256_path: Path
    sha256: str
    vocab_size: int


def filter_training_sentences(
    sentences: Iterable[str], max_sentence_length: int, counts: dict[str, int]
) -> Iterator[str]:
    """Yield the sentences SentencePiece can train on, counting the skipped ones in ``counts``."""
    for sentence in sentences:
        if not sentence:
            counts["empty"] += 1
        elif len(sentence.encode("utf-8")) > max_sentence_length:
            counts["too_long"] += 1
        else:
            counts["used"] += 1
            yield sentence


def check_training_options(
    vocab_size: int, model_type: str, normalization: str, max_sentence_length: int
) -> None:
    """Raise ConfigError on an invalid ``train_sentencepiece`` option."""
    check_range("tokenizer.vocab_size", vocab_size, low=EOS_ID + 1)
    check_choice("tokenizer.model_type", model_type, MODEL_TYPES)
    check_choice("tokenizer.normalization", normalization, NORMALIZATION_RULES)
    check_range("tokenizer.max_sentence_length", max_sentence_length, low=1)


def run_sentencepiece_trainer(sentences: Iterator[str], options: dict) -> bytes:
    """Train in memory and return the serialized model.

    Raises:
        ConfigError: ``vocab_size`` is below the number of pieces the corpus requires.
    """
    model_writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model_writer, **options
        )
    except RuntimeError as error:
        # With byte_fallback=True and character_coverage=1.0 every byte and every distinct
        # character needs a piece, so the vocabulary has a floor that depends on the corpus.
        match = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if match is None:
            raise
        raise ConfigError(
            f"tokenizer.vocab_size: {match.group(1)} is too small for this corpus, which needs "
            f"at least {match.group(2)} pieces (256 byte pieces, the special tokens and every "
            f"distinct character). Set tokenizer.vocab_size to {match.group(2)} or more."
        ) from error
    return model_writer.getvalue()


def format_vocab(processor: spm.SentencePieceProcessor) -> bytes:
    """Return the human-readable vocabulary: one ``piece<TAB>score`` line per id."""
    lines = [
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    ]
    return "".join(lines).encode("utf-8")


def write_model_files(model_bytes: bytes, model_dir: Path, name: str) -> SentencePieceModel:
    """Write the model, its ``.vocab`` and its ``.sha256`` atomically into ``model_dir``."""
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    sha256 = compute_bytes_sha256(model_bytes)
    model_path = model_dir / f"{name}.model"
    vocab_path = model_dir / f"{name}.vocab"
    sha256_path = model_dir / f"{name}.sha256"
    write_bytes_atomically(model_path, model_bytes)
    write_bytes_atomically(vocab_path, format_vocab(processor))
    # Same layout as `sha256sum` output, so `sha256sum -c` can check the model too.
    write_bytes_atomically(sha256_path, f"{sha256}  {model_path.name}\n".encode())
    return SentencePieceModel(
        path=model_path,
        vocab_path=vocab_path,
        sha256_path=sha256_path,
        sha256=sha256,
        vocab_size=processor.get_piece_size(),
    )


def train_sentencepiece(
    sentences: Iterable[str],
    model_dir: str | Path,
    vocab_size: int,
    name: str = "spm",
    model_type: str = "unigram",
    normalization: str = "nmt_nfkc",
    seed: int = 0,
    max_sentence_length: int = 4192,
    remove_extra_whitespaces: bool | None = None,
) -> SentencePieceModel:
    """Train a SentencePiece model on the given sentences and write it into ``model_dir``.

    Only the sentences passed in are used, so pass the training split alone. The model uses
    byte fallback with full character coverage, so any UTF-8 text, including CJK characters
    and emoji never seen in training, encodes without the unknown token and decodes back.
    Special ids are fixed: pad 0, unk 1, bos 2, eos 3. ``hard_vocab_limit`` is off, so a corpus
    too small for ``vocab_size`` yields a smaller vocabulary (logged as a warning) instead
    of an error.

    Note:
        ``normalization`` picks SentencePiece's normalization rule and should be chosen per
        language. The default ``nmt_nfkc`` applies Unicode NFKC, so decoded text can differ
        from the input. It rewrites half-width katakana to full-width (``ｶﾀｶﾅ`` becomes
        ``カタカナ``) and compatibility characters to their plain forms (``①`` becomes ``1``,
        the ligature ``ﬁ`` becomes ``fi``), and it turns tabs into spaces. ``identity`` keeps
        text byte-exact, so decode(encode(text)) == text.

    Args:
        sentences: training sentences; empty ones and ones longer than
            ``max_sentence_length`` UTF-8 bytes are skipped with a warning.
        model_dir: directory that receives ``<name>.model``, ``<name>.vocab`` and
            ``<name>.sha256``; created if missing.
        vocab_size: requested number of pieces, at least 256 byte pieces plus the four
            special tokens plus every distinct character in the corpus.
        name: file name stem of the written files.
        model_type: ``"unigram"`` or ``"bpe"``.
        normalization: one of ``NORMALIZATION_RULES``.
        seed: seed of SentencePiece's random generator, set right before training because
            the generator is global to the process. Training uses every sentence, so on
            sentencepiece 0.2.3 two seeds gave identical models. The same seed and corpus
            gave identical bytes across processes (5000 sentences, 2 threads).
        max_sentence_length: longest sentence used, in UTF-8 bytes.
        remove_extra_whitespaces: collapse runs of spaces and drop leading and trailing
            spaces. None means True for every rule except ``identity``, which keeps spaces.

    Returns:
        The written file paths, the model's sha256 and its actual vocabulary size.

    Raises:
        ConfigError: an option is invalid, or ``vocab_size`` is below the corpus's minimum.
        DataError: no usable sentence was given.
    """
    check_training_options(vocab_size, model_type, normalization, max_sentence_length)
    if remove_extra_whitespaces is None:
        remove_extra_whitespaces = normalization != "identity"
    options = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "normalization_rule_name": normalization,
        "remove_extra_whitespaces": remove_extra_whitespaces,
        "max_sentence_length": max_sentence_length,
        "byte_fallback": True,
        "character_coverage": 1.0,
        "hard_vocab_limit": False,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "num_threads": TRAINING_THREADS,
        "minloglevel": 2,
    }
    counts = {"used": 0, "empty": 0, "too_long": 0}
    filtered = filter_training_sentences(sentences, max_sentence_length, counts)
    # SentencePiece fails with an unclear internal error on an empty corpus, so check first.
    first = next(filtered, None)
    if first is None:
        raise DataError(
            f"No usable training sentences for the tokenizer ({counts['empty']} empty, "
            f"{counts['too_long']} longer than {max_sentence_length} bytes). Pass the "
            "training split, or raise tokenizer.max_sentence_length."
        )
    spm.set_random_generator_seed(seed)
    model_bytes = run_sentencepiece_trainer(prepend(first, filtered), options)
    log_training_summary(counts, max_sentence_length)
    model = write_model_files(model_bytes, Path(model_dir), name)
    if model.vocab_size < vocab_size:
        logger.warning(
            "Tokenizer vocabulary has %d pieces, fewer than the requested %d, because the "
            "training corpus is too small; %s uses the smaller vocabulary.",
            model.vocab_size,
            vocab_size,
            model.path,
        )
    return model


def prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    """Yield ``first`` and then every item of ``rest``."""
    yield first
    yield from rest


def log_training_summary(counts: dict[str, int], max_sentence_length: int) -> None:
    """Log a warning when training skipped sentences, since the caller did not ask for that."""
    if counts["empty"] or counts["too_long"]:
        logger.warning(
            "Tokenizer training skipped %d empty sentences and %d sentences longer than %d "
            "UTF-8 bytes; it used %d.",
            counts["empty"],
            counts["too_long"],
            max_sentence_length,
            counts["used"],
        )


def read_recorded_sha256(model_path: Path) -> str | None:
    """Return the sha256 stored next to a model in ``<stem>.sha256``, or None if there is none."""
    sha256_path = model_path.with_suffix(".sha256")
    if not sha256_path.is_file():
        return None
    fields = sha256_path.read_text(encoding="utf-8").split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise DataError(
            f"{sha256_path}: line 1: expected a 64-digit hex sha256, found {fields[:1]!r}. "
            "Retrain the tokenizer to rewrite the file, or delete it to skip the check."
        )
    return fields[0]


def load_sentencepiece(
    path: str | Path, expected_sha256: str | None = None
) -> SentencePieceTokenizer:
    """Load a SentencePiece model after checking its sha256.

    Args:
        path: the ``.model`` file.
        expected_sha256: hex sha256 the file must have. When None, the hash recorded in
            ``<stem>.sha256`` next to the model is used; with neither, nothing is checked.

    Returns:
        The tokenizer, carrying the model file's actual sha256.

    Raises:
        DataError: the file is missing, its sha256 differs from the expected one, or
            SentencePiece cannot parse it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: tokenizer model not found. Train the pipeline first, or pass the path "
            "of an existing .model file."
        )
    model_bytes = path.read_bytes()
    actual = compute_bytes_sha256(model_bytes)
    expected = expected_sha256 or read_recorded_sha256(path)
    if expected is not None and actual != expected.lower():
        raise DataError(
            f"{path}: sha256 mismatch: expected {expected}, found {actual}. The tokenizer "
            "changed since the model was trained; restore the original file, or retrain so "
            "that the tokenizer and the network match."
        )
    try:
        processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError as error:
        raise DataError(
            f"{path}: not a valid SentencePiece model ({error}). Retrain the tokenizer."
        ) from error
    return SentencePieceTokenizer(processor, path, actual)
