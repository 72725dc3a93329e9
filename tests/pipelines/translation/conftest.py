"""Fixtures of the translation tests: a tiny in-code parallel corpus in files, and its config."""

import dataclasses

import pytest

from pipelines.translation.config import TINY

ENGLISH = [
    "a dog runs",
    "a cat sleeps",
    "two men talk",
    "a woman sings",
    "the boy plays football",
    "a girl reads a book",
    "the man rides a bike",
    "children play in the park",
    "a dog swims",
    "the woman walks home",
    "a man eats bread",
    "two dogs run in the snow",
]
GERMAN = [
    "ein hund rennt",
    "eine katze schläft",
    "zwei männer reden",
    "eine frau singt",
    "der junge spielt fußball",
    "ein mädchen liest ein buch",
    "der mann fährt fahrrad",
    "kinder spielen im park",
    "ein hund schwimmt",
    "die frau geht nach hause",
    "ein mann isst brot",
    "zwei hunde rennen im schnee",
]


@pytest.fixture
def corpus_files(tmp_path):
    """Write the tiny corpus as train/val/test pairs of line-aligned files; return name -> path."""
    paths = {}
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        for language, lines in (("en", ENGLISH), ("de", GERMAN)):
            path = tmp_path / f"{split}.{language}"
            path.write_text("".join(line + "\n" for line in lines[:count]), encoding="utf-8")
            paths[f"{split}.{language}"] = path
    return paths


@pytest.fixture
def tiny_config(corpus_files):
    """Return the tiny preset reading the in-code corpus through the 'files' dataset."""
    data = dataclasses.replace(
        TINY.data,
        dataset="files",
        max_examples=None,
        source_vocab_size=300,
        target_vocab_size=300,
        train_source=str(corpus_files["train.en"]),
        train_target=str(corpus_files["train.de"]),
        val_source=str(corpus_files["val.en"]),
        val_target=str(corpus_files["val.de"]),
        test_source=str(corpus_files["test.en"]),
        test_target=str(corpus_files["test.de"]),
    )
    train = dataclasses.replace(TINY.train, steps_per_epoch=3, validation_steps=1, batch_size=4)
    export = dataclasses.replace(
        TINY.export, max_source_length=24, parity_sentences=4, latency_runs=2
    )
    return dataclasses.replace(TINY, data=data, train=train, export=export)
