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
