"""Config of the sentiment pipeline: dataset, truncation, tokenizer, recurrent classifier, presets."""

from __future__ import annotations

import dataclasses

from shared.config import (
    ExportConfig,
    RecurrentConfig,
    TrainConfig,
    TuneConfig,
    check_choice,
    check_range,
)
from shared.errors import ConfigError
from shared.runs import default_run_dir

DATASETS = ("imdb", "imdb_sentences", "sst2", "sst5", "csv")
TRUNCATIONS = ("head", "tail", "head_tail")
POOLINGS = ("attention", "max", "last_state")
CLASS_WEIGHT_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data: which dataset, the validation carve-out, truncation and the tokenizer.

    Attributes:
        dataset: ``imdb`` (aclImdb archive), ``imdb_sentences`` (the same reviews cut into
            sentences, each labelled with its review's label, for pretraining sentence
            classifiers), ``sst2`` / ``sst5`` (sentence-level SST), or ``csv`` (the user's
            own CSV or TSV file of text and label).
        train_file: the user's training file for ``csv``; a ``.tsv`` name is read as
            tab-separated, anything else as comma-separated. It needs a header row.
        test_file: the user's test file for ``csv``; optional. Its labels must appear in
            the training file.
        text_column: header name of the text column in ``train_file`` and ``test_file``.
        label_column: header name of the label column.
        cache_dir: folder for the parsed IMDB archive; None means the user cache folder
            (``$XDG_CACHE_HOME/rnn-pipelines/data/sentiment``).
        validation_fraction: share of the training split held out, stratified by label,
            for early stopping and tuning. The test split is never used for either.
        validation_from: ``train`` carves the validation split from the training split
            (``validation_fraction``); ``dev`` takes the dataset's own dev split instead and
            trains on the whole training split (SST only: the split its authors made for
            model selection).
        max_length: tokens kept per text; longer texts are truncated (and counted).
        truncation: which tokens a long text keeps: the first ``max_length`` (``head``),
            the last (``tail``), or the first ``head_fraction`` of them and the rest from
            the end (``head_tail``).
        head_fraction: share of ``max_length`` taken from the start under ``head_tail``.
        vocab_size: SentencePiece vocabulary size, trained on the training split only.
            With byte fallback it needs about 300 pieces or more.
        tokenizer_model_type: SentencePiece ``unigram`` or ``bpe``.
        tokenizer_max_texts: train the tokenizer on at most this many training texts,
            drawn with the train seed; None uses every training text.
        strip_html: replace HTML line breaks (``<br />``, common in IMDB reviews) with spaces.
        lowercase: lower-case every text before tokenizing.
    """

    dataset: str = "imdb"
    train_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    cache_dir: str | None = None
    validation_fraction: float = 0.1
    validation_from: str = "train"
    max_length: int = 400
    truncation: str = "head_tail"
    head_fraction: float = 0.25
    vocab_size: int = 8000
    tokenizer_model_type: str = "unigram"
    tokenizer_max_texts: int | None = None
    strip_html: bool = True
    lowercase: bool = True

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_range("data.validation_fraction", self.validation_fraction, 0.0, 0.5, low_inclusive=False)
        check_choice("data.validation_from", self.validation_from, ("train", "dev"))
        if self.validation_from == "dev" and self.dataset not in ("sst2", "sst5"):
            raise ConfigError(
                f"data.validation_from is 'dev' but data.dataset {self.dataset!r} has no dev split; only sst2 "
                "and sst5 have one. Use --set data.validation_from=train to carve it from the training split."
            )
        check_range("data.max_length", self.max_length, 2, 100_000)
        check_choice("data.truncation", self.truncation, TRUNCATIONS)
        check_range("data.head_fraction", self.head_fraction, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        check_range("data.vocab_size", self.vocab_size, 300, 1_000_000)
        if self.tokenizer_max_texts is not None:
            check_range("data.tokenizer_max_texts", self.tokenizer_max_texts, 1)
        check_choice("data.tokenizer_model_type", self.tokenizer_model_type, ("unigram", "bpe"))
        if self.dataset == "csv" and not self.train_file:
            raise ConfigError(
                "data.dataset is 'csv' but data.train_file is not set; pass "
                "--set data.train_file=PATH to a CSV or TSV file with a header row."
            )
        if self.text_column == self.label_column:
            raise ConfigError(
                f"data.text_column and data.label_column are both {self.text_column!r}; "
                "they must name two different columns."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig(RecurrentConfig):
    """Embedding, a recurrent stack, pooling over time, dropout and a softmax layer.

    Attributes:
        embedding_dim: size of each token embedding.
        embedding_dropout: dropout on whole embedding channels (SpatialDropout1D).
        pooling: ``attention`` (a learned weighted mean over real steps), ``max`` (the
            largest value of each feature over real steps) or ``last_state`` (the final
            state of each direction).
        attention_units: hidden size of the attention scorer.
        head_dropout: dropout between the pooled vector and the softmax layer.
        class_weights: weight the loss by inverse class frequency; ``auto`` turns it on
            when the largest class is more than ``imbalance_ratio`` times the smallest.
        imbalance_ratio: the ratio at which ``auto`` turns class weights on.
        members: number of classifiers trained on their own (seeds ``train.seed + k``, the
            same split and tokenizer) and averaged into one model; 1 trains one classifier.
        member_poolings: pooling of each ensemble member in turn (member ``k`` takes entry
            ``k`` modulo its length), so that members differ by more than their seed. Empty
            gives every member ``pooling``. Unused with one member, which takes ``pooling``.
        init_from: run directory of a trained sentiment model. Its tokenizer replaces
            tokenizer training, and every layer whose name and weight shapes match starts
            from its weights (transfer learning, e.g. from IMDB to SST). None trains
            from scratch.
    """

    cell: str = "lstm"
    units: int = 64
    layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.0
    embedding_dim: int = 128
    embedding_dropout: float = 0.2
    pooling: str = "attention"
    attention_units: int = 64
    head_dropout: float = 0.3
    class_weights: str = "auto"
    imbalance_ratio: float = 1.5
    members: int = 1
    member_poolings: tuple[str, ...] = ()
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("model.members", self.members, 1, 16)
        for pooling in self.member_poolings:
            check_choice("model.member_poolings", pooling, POOLINGS)

        check_range("model.embedding_dim", self.embedding_dim, 1, 8192)
        check_range("model.embedding_dropout", self.embedding_dropout, 0.0, 1.0, high_inclusive=False)
        check_choice("model.pooling", self.pooling, POOLINGS)
        check_range("model.attention_units", self.attention_units, 1, 8192)
        check_range("model.head_dropout", self.head_dropout, 0.0, 1.0, high_inclusive=False)
        check_choice("model.class_weights", self.class_weights, CLASS_WEIGHT_MODES)
        check_range("model.imbalance_ratio", self.imbalance_ratio, 1.0)


    def member(self, index: int) -> ModelConfig:
        """Return the config of ensemble member ``index``: one classifier with its pooling."""
        pooling = self.member_poolings[index % len(self.member_poolings)] if self.member_poolings else self.pooling
        return dataclasses.replace(self, members=1, member_poolings=(), pooling=pooling)


@dataclasses.dataclass(frozen=True)
class SentimentExportConfig(ExportConfig):
    """Export: the shared fields plus the fixed input length of the TFLite models.

    Attributes:
        max_length: token ids per input of ``classify_fixed`` and the TFLite models; longer
            texts are truncated as ``data.truncation`` sets. None uses ``data.max_length``.
            A shorter length makes the phone model smaller to convert and faster to run.
    """

    max_length: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is not None:
            check_range("export.max_length", self.max_length, 2, 100_000)


@dataclasses.dataclass(frozen=True)
class SentimentConfig:
    """Every section of the sentiment pipeline's config."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    export: SentimentExportConfig = dataclasses.field(default_factory=SentimentExportConfig)

    def fixed_length(self) -> int:
        """Return the input length of the TFLite models: ``export.max_length`` or ``data.max_length``."""
        return self.export.max_length or self.data.max_length


def build_search_space() -> dict[str, dict]:
    """Return the sentiment search space: rate and batch, recurrent size, then dropouts."""
    return {
        "learning_rate": {"type": "float", "min": 5e-4, "max": 5e-3, "sampling": "log", "stage": "learning_rate"},
        "batch_size": {"type": "choice", "values": [32, 64, 128], "stage": "learning_rate"},
        "units": {"type": "int", "min": 32, "max": 128, "step": 32, "stage": "size"},
        "embedding_dim": {"type": "choice", "values": [64, 128, 256], "stage": "size"},
        "embedding_dropout": {"type": "float", "min": 0.0, "max": 0.4, "stage": "regularization"},
        "head_dropout": {"type": "float", "min": 0.0, "max": 0.5, "stage": "regularization"},
    }


# Four members, two with attention pooling and two with max pooling, read up to 800 tokens;
# the phone models read 400. Mixed poolings scored higher on the validation split than
# the same number of attention-only members (docs/sentiment.md lists the candidates).
DEFAULT = SentimentConfig(
    data=DataConfig(max_length=800),
    model=ModelConfig(members=4, member_poolings=("attention", "max")),
    train=TrainConfig(
        epochs=4,
        batch_size=64,
        learning_rate=2e-3,
        lr_schedule="cosine",
        warmup_steps=100,
        early_stopping_patience=2,
        backup_every_steps=200,
    ),
    tune=TuneConfig(objective="val_accuracy", direction="max", epochs_per_trial=2, max_trials=6,
                    search_space=build_search_space()),
    # Parity and accuracy of each TFLite variant are measured on this many test reviews.
    export=SentimentExportConfig(parity_samples=1000, representative_samples=200, latency_runs=20, max_length=400),
)

TINY = dataclasses.replace(
    DEFAULT,
    data=dataclasses.replace(DEFAULT.data, max_length=64, vocab_size=1000, tokenizer_max_texts=2000),
    model=dataclasses.replace(
        DEFAULT.model, units=8, embedding_dim=16, attention_units=8, embedding_dropout=0.0, head_dropout=0.0,
        members=1, member_poolings=(),
    ),
    train=dataclasses.replace(
        DEFAULT.train, epochs=1, steps_per_epoch=30, validation_steps=5, warmup_steps=0, lr_schedule="constant",
        learning_rate=5e-3, backup_every_steps=None,
    ),
    tune=dataclasses.replace(DEFAULT.tune, max_trials=2, epochs_per_trial=1, search_space={
        "learning_rate": {"type": "float", "min": 1e-3, "max": 1e-2, "sampling": "log", "stage": "learning_rate"},
        "units": {"type": "int", "min": 4, "max": 16, "step": 4, "stage": "size"},
        "head_dropout": {"type": "float", "min": 0.0, "max": 0.3, "stage": "regularization"},
    }),
    export=SentimentExportConfig(parity_samples=64, representative_samples=32, latency_runs=5),
)

# Default run directory of `train --preset imdb_sentences`.
IMDB_SENTENCES_RUN = str(default_run_dir("sentiment", "imdb_sentences"))

# SST starts from the imdb_sentences run (train it first), four members like the default,
# and validates on SST's dev file. `--set model.init_from=null` trains from scratch.
SST2 = dataclasses.replace(
    DEFAULT,
    data=dataclasses.replace(DEFAULT.data, dataset="sst2", max_length=80, vocab_size=4000, strip_html=False,
                             validation_from="dev"),
    model=dataclasses.replace(DEFAULT.model, embedding_dropout=0.3, head_dropout=0.5, init_from=IMDB_SENTENCES_RUN),
    export=dataclasses.replace(DEFAULT.export, max_length=None),
    train=dataclasses.replace(DEFAULT.train, epochs=8, batch_size=32, learning_rate=5e-4, warmup_steps=50,
                              early_stopping_patience=3, backup_every_steps=None),
)

SST5 = dataclasses.replace(SST2, data=dataclasses.replace(SST2.data, dataset="sst5"))

# Pretraining for SST: the sentences of the IMDB training reviews, each labelled with its
# review's label, give 37 times as many training sentences as SST-2 has. Members and
# poolings match SST2's ensemble, so that SST member k starts from member k here.
IMDB_SENTENCES = dataclasses.replace(
    DEFAULT,
    data=dataclasses.replace(DEFAULT.data, dataset="imdb_sentences", max_length=80, tokenizer_max_texts=100_000),
    model=dataclasses.replace(DEFAULT.model, embedding_dropout=0.3, head_dropout=0.5),
    export=dataclasses.replace(DEFAULT.export, max_length=None),
    train=dataclasses.replace(DEFAULT.train, epochs=3, batch_size=128, learning_rate=2e-3, warmup_steps=100,
                              early_stopping_patience=1, backup_every_steps=500),
)

PRESETS = {"default": DEFAULT, "tiny": TINY, "sst2": SST2, "sst5": SST5, "imdb_sentences": IMDB_SENTENCES}
