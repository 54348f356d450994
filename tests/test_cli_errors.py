"""Every user error of the `cxrgen` command line ends in one `Error:` line, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT


def cxrgen(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the checkout's `cxrgen` in ``cwd`` and return the finished process."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=300,
    )


def error_text(result: subprocess.CompletedProcess) -> str:
    """Return stderr from the `Error:` line on, after checking that the command failed without a traceback."""
    assert result.returncode in (1, 2), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "\nError: " in f"\n{result.stderr}", result.stderr[-3000:]
    return "Error: " + f"\n{result.stderr}".rsplit("\nError: ", 1)[1].rstrip("\n")


def error_line(result: subprocess.CompletedProcess) -> str:
    """Return the error message after checking that it is a single line, the last one on stderr."""
    text = error_text(result)
    assert "\n" not in text, text
    return text


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder with the checkout's params.yaml and dvc.yaml and no data."""
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def set_params(project: Path, *assignments: str) -> None:
    result = cxrgen(["params", "set", *assignments], project)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("extract", "extract: data/raw/reports: report folder not found; run the download stage first"),
        ("featurize", "the extract stage writes it, so run `dvc repro extract` first"),
        ("tokenize", "data/interim/reports.parquet: not found; the extract stage writes it"),
        ("train", "data/text/targets.parquet: not found; the tokenize stage writes it"),
        ("score", "models/model.keras: model not found; run the train stage first"),
    ],
)
def test_missing_input_names_stage(project: Path, stage: str, expected: str) -> None:
    set_params(project, "featurize.weights=random")

    line = error_line(cxrgen([stage], project))

    assert expected in line


def test_missing_params_file(project: Path) -> None:
    line = error_line(cxrgen(["extract", "--params", "absent.yaml"], project))

    assert line == "Error: extract: absent.yaml: not found; run from the repository root or pass --params"


def test_invalid_params_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("extract: [1\n", encoding="utf-8")

    line = error_line(cxrgen(["extract"], project))

    assert line == "Error: extract: params.yaml: invalid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"


def test_repeated_params_section(project: Path) -> None:
    (project / "params.yaml").write_text("train:\n  epochs: 3\nsplit:\n  seed: 1\ntrain:\n  epochs: 5\n", encoding="utf-8")

    line = error_line(cxrgen(["extract"], project))

    assert line == (
        "Error: extract: params.yaml: invalid YAML: line 5, column 1: key 'train' appears twice (first on line 1); keep one"
    )


def test_params_check_accepts_checkout_file(project: Path) -> None:
    result = cxrgen(["params", "check"], project)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "params.yaml: valid\n"


def test_params_check_names_missing_sections(project: Path) -> None:
    (project / "params.yaml").write_text("", encoding="utf-8")

    line = error_line(cxrgen(["params", "check"], project))

    assert line.startswith("Error: params.yaml: missing download, extract, split, featurize, tokenize, model, train, score")
    assert "so dvc repro stops" in line


def test_params_check_names_missing_dotted_key(project: Path) -> None:
    params = (project / "params.yaml").read_text(encoding="utf-8")
    without_max_pixels = [line for line in params.splitlines() if not line.strip().startswith("max_pixels:")]
    (project / "params.yaml").write_text("\n".join(without_max_pixels) + "\n", encoding="utf-8")

    line = error_line(cxrgen(["params", "check"], project))

    assert line.startswith("Error: params.yaml: missing featurize.max_pixels, which dvc.yaml declares")


def test_misspelt_param_suggests_key(project: Path) -> None:
    (project / "params.yaml").write_text("extract:\n  min_word: 2\n", encoding="utf-8")

    text = error_text(cxrgen(["extract"], project))

    assert text.splitlines() == [
        "Error: extract: params.yaml: invalid parameters:",
        "  extract.min_word: unknown key (did you mean 'min_words'?); valid keys here: min_words, projections",
    ]


def test_missing_mirror_folder(project: Path) -> None:
    set_params(project, f"download.mirror={project / 'no-mirror'}")

    line = error_line(cxrgen(["download"], project))

    assert f"download.mirror {project / 'no-mirror'}: folder not found" in line


def test_mirror_path_is_a_file(project: Path) -> None:
    (project / "mirror.tgz").write_bytes(b"not a folder")
    set_params(project, f"download.mirror={project / 'mirror.tgz'}")

    line = error_line(cxrgen(["download"], project))

    assert f"download.mirror {project / 'mirror.tgz'}: is a file, expected a folder" in line


def test_mirror_archive_not_openi(project: Path) -> None:
    mirror = project / "mirror"
    mirror.mkdir()
    (mirror / "NLMCXR_reports.tgz").write_bytes(b"<html>an error page</html>")
    set_params(project, f"download.mirror={mirror}", "download.images=false")

    line = error_line(cxrgen(["download"], project))

    assert "NLMCXR_reports.tgz: sha256 is" in line
    assert not (project / "data" / "raw" / "reports").exists()


def test_missing_glove_file(project: Path) -> None:
    set_params(project, "tokenize.glove=absent-glove.txt", "tokenize.min_count=1")
    interim = project / "data" / "interim"
    interim.mkdir(parents=True)
    pd.DataFrame({"report_id": [1], "findings": ["No effusion."], "impression": ["Normal."]}).to_parquet(
        interim / "reports.parquet"
    )
    pd.DataFrame({"study_id": ["CXR1_IM-0001"], "report_id": [1], "split": ["train"]}).to_parquet(
        interim / "splits.parquet"
    )

    line = error_line(cxrgen(["tokenize"], project))

    assert line.startswith("Error: tokenize: absent-glove.txt: GloVe file not found")
    assert not (project / "data" / "text" / "tokenizer.json").exists()


def test_bad_log_level(project: Path) -> None:
    line = error_line(cxrgen(["extract", "--log-level", "LOUD"], project))

    assert "'LOUD' is not one of" in line


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("tokenize.sections=[findings", "the value is not valid YAML (line 1, column 10"),
        ("model.units=8", "model.units: model is a value, not a section"),
        ("extract.min_word=2", "unknown key (did you mean 'min_words'?)"),
        ("no-equals-sign", "expected KEY=VALUE"),
    ],
)
def test_params_set_rejects(project: Path, assignment: str, expected: str) -> None:
    before = (project / "params.yaml").read_bytes()

    text = error_text(cxrgen(["params", "set", assignment], project))

    assert expected in text
    assert (project / "params.yaml").read_bytes() == before


def test_params_set_on_invalid_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("model: [simple\n", encoding="utf-8")

    line = error_line(cxrgen(["params", "set", "model=simple"], project))

    assert line.startswith("Error: params.yaml: invalid YAML: line 2, column 1")
