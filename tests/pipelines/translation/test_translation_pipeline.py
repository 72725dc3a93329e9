"""End-to-end tests of the translation commands on the tiny corpus, and the real-data check."""

import csv
import io
import json

import pytest

from pipelines.translation.config import (
    PRESETS,
    TINY,
    TranslationDataConfig,
    TranslationModelConfig,
)
from pipelines.translation.pipeline import COMMANDS
from shared.cli import run_cli
from shared.errors import ConfigError


def run(presets, *argv):
    stdout = io.StringIO()
    code = run_cli("translation", presets, COMMANDS, argv=list(argv), stdout=stdout)
    return code, stdout.getvalue()


def test_presets_valid():
    assert set(PRESETS) == {"default", "tiny"}


def test_same_languages_rejected():
    with pytest.raises(ConfigError, match="two different languages"):
        TranslationDataConfig(source_language="de", target_language="de")


def test_anki_needs_english():
    with pytest.raises(ConfigError, match="make one side 'en'"):
        TranslationDataConfig(dataset="anki", source_language="es", target_language="fr")


def test_unknown_attention_rejected():
    with pytest.raises(ConfigError, match="model.attention"):
        TranslationModelConfig(attention="dot-product")


def test_search_space_has_cell_and_attention():
    assert {"cell", "attention"} <= set(TINY.tune.search_space)


@pytest.mark.slow
def test_train_evaluate_predict(tiny_config, tmp_path):
    presets = {"tiny": tiny_config}
    run_dir = tmp_path / "run"
    code, _ = run(
        presets, "train", "--preset", "tiny", "--run-dir", str(run_dir), "--data-dir", str(tmp_path)
    )
    assert code == 0
    code, output = run(
        presets,
        "evaluate",
        "--preset",
        "tiny",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(tmp_path),
    )
    assert code == 0
    result = json.loads(output)
    assert set(result) >= {"bleu", "chrf", "greedy_bleu"}
    assert 0 <= result["empty_translations"] <= result["sentences"]
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert ("## Warning" in report) == (result["empty_translations"] > result["sentences"] // 2)
    assert (run_dir / "attention_test.png").is_file()
    assert "Sample translations" in (run_dir / "report.md").read_text(encoding="utf-8")
    sentences = tmp_path / "input.txt"
    sentences.write_text("a dog runs\n\ntwo men talk\n", encoding="utf-8")
    code, output = run(
        presets, "predict", "--preset", "tiny", "--run-dir", str(run_dir), "--input", str(sentences)
    )
    assert code == 0
    assert len(output.split("\n")) == 4  # Three lines, the blank one kept, plus the final newline.


def test_predict_without_model(tiny_config, tmp_path):
    code, _ = run(
        {"tiny": tiny_config},
        "predict",
        "--preset",
        "tiny",
        "--run-dir",
        str(tmp_path / "none"),
        "--input",
        str(tmp_path / "missing.txt"),
    )
    assert code == 1


@pytest.mark.slow
@pytest.mark.realdata
def test_multi30k_tiny_end_to_end(data_dir, tmp_path):
    """A few dozen training steps on Multi30k, then evaluate on 100 test sentences."""
    run_dir = tmp_path / "run"
    common = ["--preset", "tiny", "--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    assert run(PRESETS, "train", *common)[0] == 0
    code, output = run(PRESETS, "evaluate", *common, "--limit", "100")
    assert code == 0
    assert json.loads(output)["sentences"] == 100


def test_scores_identical_text():
    from pipelines.translation.pipeline import score_translations

    scores = score_translations(
        ["Ein Hund rennt.", "Zwei Männer reden."], ["Ein Hund rennt.", "Zwei Männer reden."], "de"
    )
    assert (scores["bleu"], scores["chrf"]) == (100.0, 100.0)


def test_japanese_scored_by_character():
    from pipelines.translation.pipeline import score_translations

    assert "tok:char" in score_translations(["猫です。"], ["猫です。"], "ja")["bleu_signature"]


def test_stdin_bad_utf8_named():
    from pipelines.translation.pipeline import read_input_lines
    from shared.errors import DataError

    class FakeStdin:
        buffer = io.BytesIO(b"a dog\nbad \xff\n")

    with pytest.raises(DataError, match="standard input: line 2"):
        read_input_lines("-", FakeStdin())


def test_stdin_blank_lines_kept():
    from pipelines.translation.pipeline import read_input_lines

    class FakeStdin:
        buffer = io.BytesIO(b"a dog\n\nmen\n")

    assert read_input_lines("-", FakeStdin()) == ["a dog", "", "men"]


def test_stdin_empty_rejected():
    from pipelines.translation.pipeline import read_input_lines
    from shared.errors import DataError

    class FakeStdin:
        buffer = io.BytesIO(b"")

    with pytest.raises(DataError, match="no sentences to translate"):
        read_input_lines("-", FakeStdin())


@pytest.mark.slow
@pytest.mark.parametrize(("max_size_kb", "feasible"), [("1", "False"), ("100000", "True")])
def test_tune_edge_limit(tiny_config, tmp_path, max_size_kb, feasible):
    run_dir = tmp_path / "tune"
    code, output = run(
        {"tiny": tiny_config},
        "tune",
        "--preset",
        "tiny",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(tmp_path),
        "--max-trials",
        "1",
        "--stage",
        "learning_rate",
        "--max-size-kb",
        max_size_kb,
    )
    assert code == 0
    with open(run_dir / "trials.csv", newline="", encoding="utf-8") as handle:
        (trial,) = list(csv.DictReader(handle))
    assert float(trial["size_kb"]) > 1.0
    assert trial["feasible"] == feasible
    assert (run_dir / "best.yaml").exists() == (feasible == "True")
