"""Config of the translation pipeline: data, language pair, tokenizers, model, decoding, presets."""

from __future__ import annotations

import dataclasses

from shared.config import (
    ExportConfig,
    RecurrentConfig,
    TrainConfig,
    TuneConfig,
    check_choice,
    check_range,
    default_search_space,
)
from shared.errors import ConfigError

DATASETS = ("multi30k", "anki", "files")
MULTI30K_LANGUAGES = ("en", "de", "fr")
# Anki files pair English with one other language; the key is that language's code.
ANKI_LANGUAGES = ("es", "fr", "ja")
ATTENTION_TYPES = ("additive", "multiplicative")
NORMALIZATIONS = ("auto", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity")
TOKENIZER_TYPES = ("unigram", "bpe")


@dataclasses.dataclass(frozen=True)
class TranslationDataConfig:
    """Source of the sentence pairs, the language pair, tokenizers and length limits.

    ``dataset`` picks the source. ``multi30k`` reads the six Multi30k task 1 splits. ``anki``
    reads a Tatoeba/ManyThings tab-separated file (English first) and splits it by a seeded
    shuffle. ``files`` reads the user's own line-aligned source and target files, and splits
    a validation set off the training pair when no validation pair is given.
    """

    dataset: str = "multi30k"
    source_language: str = "en"
    target_language: str = "de"
    anki_path: str = ""
    train_source: str = ""
    train_target: str = ""
    val_source: str = ""
    val_target: str = ""
    test_source: str = ""
    test_target: str = ""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_examples: int | None = None
    joint_vocabulary: bool = False
    source_vocab_size: int = 6000
    target_vocab_size: int = 6000
    tokenizer_type: str = "unigram"
    normalization: str = "auto"
    max_tokens: int = 64
    bucket_boundaries: tuple[int, ...] = (8, 11, 14, 17, 20, 24, 28, 34, 42, 52)

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        if self.source_language == self.target_language:
            raise ConfigError(
                f"data.source_language and data.target_language are both {self.source_language!r}; "
                "choose two different languages."
            )
        self.check_languages()
        if self.dataset == "files" and not (self.train_source and self.train_target):
            raise ConfigError(
                "data.train_source and data.train_target: the 'files' dataset needs both paths; "
                "set them with --set data.train_source=PATH --set data.train_target=PATH."
            )
        check_range("data.val_fraction", self.val_fraction, 0.0, 0.5, low_inclusive=False)
        check_range("data.test_fraction", self.test_fraction, 0.0, 0.5)
        if self.max_examples is not None:
            check_range("data.max_examples", self.max_examples, 2)
        check_range("data.source_vocab_size", self.source_vocab_size, 300, 65536)
        check_range("data.target_vocab_size", self.target_vocab_size, 300, 65536)
        check_choice("data.tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        check_choice("data.normalization", self.normalization, NORMALIZATIONS)
        check_range("data.max_tokens", self.max_tokens, 2, 1024)
        boundaries = list(self.bucket_boundaries)
        if not boundaries or boundaries != sorted(set(boundaries)) or boundaries[0] < 1:
            raise ConfigError(
                f"data.bucket_boundaries: {boundaries!r}; expected increasing positive integers, "
                "e.g. [8, 16, 32]."
            )

    def check_languages(self) -> None:
        """Raise ConfigError unless the language pair is available for ``dataset``."""
        pair = (self.source_language, self.target_language)
        if self.dataset == "multi30k":
            names = ("data.source_language", "data.target_language")
            for where, language in zip(names, pair, strict=True):
                check_choice(where, language, MULTI30K_LANGUAGES)
        elif self.dataset == "anki" and not self.anki_path:
            other = [language for language in pair if language != "en"]
            if len(other) != 1:
                raise ConfigError(
                    f"data.source_language/target_language: Anki files pair English with another "
                    f"language, got {pair!r}; make one side 'en'."
                )
            check_choice("data.source_language (or target_language)", other[0], ANKI_LANGUAGES)


@dataclasses.dataclass(frozen=True)
class TranslationModelConfig(RecurrentConfig):
    """Encoder-decoder with attention, whose encoder stack follows the shared recurrent fields.

    ``units`` is the encoder size per direction and ``decoder_units`` the decoder RNN size.
    ``attention_units`` is the size of the attentional hidden state that feeds the output
    projection, and of the hidden layer of the additive score.
    """

    cell: str = "gru"
    units: int = 256
    bidirectional: bool = True
    embedding_dim: int = 256
    decoder_units: int = 512
    attention: str = "multiplicative"
    attention_units: int = 256
    embedding_dropout: float = 0.3
    output_dropout: float = 0.3
    label_smoothing: float = 0.1
    beam_size: int = 5
    length_penalty: float = 0.6
    max_output_ratio: float = 1.5
    max_output_extra: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("model.embedding_dim", self.embedding_dim, 1, 4096)
        check_range("model.decoder_units", self.decoder_units, 1, 8192)
        check_choice("model.attention", self.attention, ATTENTION_TYPES)
        check_range("model.attention_units", self.attention_units, 1, 8192)
        check_range(
            "model.embedding_dropout", self.embedding_dropout, 0.0, 1.0, high_inclusive=False
        )
        check_range("model.output_dropout", self.output_dropout, 0.0, 1.0, high_inclusive=False)
        check_range("model.label_smoothing", self.label_smoothing, 0.0, 1.0, high_inclusive=False)
        check_range("model.beam_size", self.beam_size, 1, 64)
        check_range("model.length_penalty", self.length_penalty, 0.0, 5.0)
        check_range("model.max_output_ratio", self.max_output_ratio, 0.1, 10.0)
        check_range("model.max_output_extra", self.max_output_extra, 0, 1024)


@dataclasses.dataclass(frozen=True)
class TranslationExportConfig(ExportConfig):
    """Export: the shared fields plus the fixed source length of the TFLite encoder."""

    tflite_variants: tuple[str, ...] = ("float32", "dynamic_range")
    max_source_length: int = 64
    parity_sentences: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("export.max_source_length", self.max_source_length, 2, 1024)
        if self.parity_sentences is not None:
            check_range("export.parity_sentences", self.parity_sentences, 1)


def build_search_space() -> dict:
    """Return the shared search space plus the cell type and the attention type."""
    space = default_search_space()
    space["cell"] = {"type": "choice", "values": ["gru", "lstm"], "stage": "size"}
    space["attention"] = {"type": "choice", "values": list(ATTENTION_TYPES), "stage": "size"}
    return space


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """The whole translation pipeline config."""

    data: TranslationDataConfig = dataclasses.field(default_factory=TranslationDataConfig)
    model: TranslationModelConfig = dataclasses.field(default_factory=TranslationModelConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            epochs=12,
            batch_size=64,
            learning_rate=1e-3,
            lr_schedule="cosine",
            clip_value=1.0,
            early_stopping_patience=3,
        )
    )
    tune: TuneConfig = dataclasses.field(
        default_factory=lambda: TuneConfig(
            max_trials=6, epochs_per_trial=2, search_space=build_search_space()
        )
    )
    export: TranslationExportConfig = dataclasses.field(default_factory=TranslationExportConfig)


DEFAULT = TranslationConfig()

TINY = dataclasses.replace(
    DEFAULT,
    data=dataclasses.replace(
        DEFAULT.data, source_vocab_size=400, target_vocab_size=400, max_examples=4000
    ),
    model=dataclasses.replace(
        DEFAULT.model,
        units=16,
        embedding_dim=16,
        decoder_units=32,
        attention_units=16,
        beam_size=3,
        embedding_dropout=0.0,
        output_dropout=0.0,
    ),
    train=dataclasses.replace(
        DEFAULT.train, epochs=1, batch_size=32, steps_per_epoch=40, validation_steps=4
    ),
    tune=dataclasses.replace(DEFAULT.tune, max_trials=2, epochs_per_trial=1),
    export=dataclasses.replace(
        DEFAULT.export,
        max_source_length=32,
        parity_sentences=20,
        latency_runs=5,
        representative_samples=10,
    ),
)

PRESETS = {"default": DEFAULT, "tiny": TINY}
