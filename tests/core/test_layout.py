"""The core library is usable without Dagster."""

import subprocess
import sys


def test_importing_the_core_library_does_not_import_dagster():
    code = "import sys, idistill_core, idistill_core.pipeline, idistill_core.cli; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_core_sources_never_mention_dagster_imports():
    from pathlib import Path

    import idistill_core

    for path in Path(idistill_core.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import dagster" not in text and "from dagster" not in text, path


def test_relative_profile_paths_resolve_against_the_repository_root():
    from pathlib import Path

    from idistill_core.project.settings import REPO_ROOT

    assert REPO_ROOT == Path(__file__).resolve().parents[2]
    assert (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "workspace.yaml").is_file()
