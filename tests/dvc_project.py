"""A temporary git repository holding a copy of this checkout, for tests that run `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for commands in the project: this venv first on PATH, a git identity."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
        **(extra or {}),
    }


def command(
    args: list[str], cwd: Path, check: bool = True, extra_env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd``; with ``check``, fail the test with the output tail on a non-zero exit."""
    result = subprocess.run(
        args, cwd=cwd, env=environment(extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def copy_checkout(target: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files of this checkout, tests excepted."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith("tests/"):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def make_project(root: Path, shared_data: Path, studies: int, settings: list[str]) -> Path:
    """Create ``root/project`` as a committed git repository and ``root/mirror`` with ``studies`` studies.

    ``settings`` are ``KEY=VALUE`` parameters passed to ``cxrgen params set`` after
    ``download.mirror``. Nothing is run yet.
    """
    project, mirror = root / "project", root / "mirror"
    project.mkdir()
    copy_checkout(project)
    command(["git", "init", "-q"], project)
    command(["git", "add", "-A"], project)
    command(["git", "commit", "-qm", "clone"], project)
    command([str(shared_data.parent / "tools" / "make-openi-mirror"), str(mirror), "--studies", str(studies)], root)
    command([sys.executable, "-m", "pipeline.cli", "params", "set", f"download.mirror={mirror}", *settings], project)
    return project
