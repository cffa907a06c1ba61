"""Issue 6.5 — security defaults: the UI binds to localhost, remote code is never run and cannot be switched on
from a profile or a load call, weights are read from safetensors/GGUF only (a pickled checkpoint is refused
without being unpickled), and target YAML paths cannot leave the configured data roots."""

import ast
import inspect
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from idistill_core.errors import ConfigError, ModelError
from idistill_core.models import loading as models
from idistill_core.models.loading import load_model
from idistill_core.project.settings import load_settings
from idistill_core.project.targets import load_target_spec

from .conftest import REPO

SOURCES = sorted((REPO / "idistill_core").rglob("*.py")) + sorted((REPO / "idistill_assets").rglob("*.py"))


class _WritesSentinel:
    """Unpickling this object writes a file: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny Llama saved as a normal HF directory (config, safetensors, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# UI
# ---------------------------------------------------------------------------------------------------------
def test_ui_binds_to_localhost_by_default():
    dry_run = subprocess.run(
        ["make", "-n", "ui"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    command = next(line for line in dry_run.splitlines() if "dagster dev" in line)
    assert "-h 127.0.0.1" in command and "0.0.0.0" not in command, command
    # and a bare `dagster-webserver` (what the workspace is also served with) defaults to localhost too
    from dagster_webserver.cli import DEFAULT_WEBSERVER_HOST

    assert DEFAULT_WEBSERVER_HOST == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------
# remote code
# ---------------------------------------------------------------------------------------------------------
def test_trust_remote_code_cannot_be_passed_or_configured(tmp_path):
    parameters = inspect.signature(load_model).parameters
    assert "trust_remote_code" not in parameters
    assert not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )  # no **kwargs to smuggle it
    profile = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    profile["trust_remote_code"] = True
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(ConfigError, match="unknown field"):
        load_settings(path)


def test_a_model_directory_with_custom_code_is_refused_without_running_it(saved_tiny, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(saved_tiny, folder)
    sentinel = tmp_path / "remote-code-ran"
    (folder / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM\n"
    )
    (folder / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig as EvilConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil-remote",
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"model spec '{folder}'"):
        load_model(str(folder))
    assert not sentinel.exists()


def test_no_library_call_enables_remote_code_or_unpickles():
    """Static guard over idistill_core and idistill_assets: no `trust_remote_code=True` (or a non-literal value),
    no torch.load / pickle / allow_pickle anywhere."""
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            literal_false = (
                isinstance(getattr(node, "value", None), ast.Constant) and node.value.value is False
            )
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not literal_false:
                problems.append(
                    f"{path.name}:{node.value.lineno} trust_remote_code={ast.unparse(node.value)}"
                )
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                problems.append(f"{path.name}:{node.value.lineno} allow_pickle")
            if isinstance(node, ast.Attribute) and node.attr == "load" and ast.unparse(node.value) == "torch":
                problems.append(f"{path.name}:{node.lineno} torch.load")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle module")
    assert not problems, problems


# ---------------------------------------------------------------------------------------------------------
# weights: safetensors / GGUF only
# ---------------------------------------------------------------------------------------------------------
def test_a_pickled_checkpoint_is_refused_and_never_unpickled(saved_tiny, tmp_path, monkeypatch):
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or original(*a, **k))
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (saved_tiny / name).exists():
            shutil.copy(saved_tiny / name, folder / name)
    sentinel = tmp_path / "pickle-ran"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _WritesSentinel(sentinel)}, handle)
    with pytest.raises(ModelError, match=f"model spec '{folder}': cannot load"):
        load_model(str(folder))
    assert calls == []  # refused before any unpickler ran (not merely by torch's weights_only guard)
    assert not sentinel.exists()


def test_loading_a_safetensors_model_never_calls_an_unpickler(saved_tiny, monkeypatch):
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called while loading a model")

        return call

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    loaded = load_model(str(saved_tiny))
    assert calls == []
    reference = load_model("tiny-llama")
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert models.model_fingerprint(loaded.model) == reference.fingerprint


# ---------------------------------------------------------------------------------------------------------
# target paths stay inside the data roots
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def roots(tmp_path):
    data = tmp_path / "data"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "dev.jsonl").write_text("{}\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("{}\n")
    (data / "link").symlink_to(outside, target_is_directory=True)
    return tmp_path, data, outside


def _spec(folder: Path, dev: str) -> Path:
    path = folder / "t.yaml"
    path.write_text(
        yaml.safe_dump({"name": "t", "metric": "nll", "dev": dev, "test": "mine/dev.jsonl", "budget": 3})
    )
    return path


@pytest.mark.parametrize(
    "dev",
    [
        "../outside/secret.jsonl",
        "mine/../../outside/secret.jsonl",
        "link/secret.jsonl",
        "ABSOLUTE",
        "/etc/passwd",
    ],
)
def test_target_paths_cannot_escape_the_data_roots(roots, dev):
    tmp_path, data, outside = roots
    dev = str(outside / "secret.jsonl") if dev == "ABSOLUTE" else dev
    with pytest.raises(ConfigError, match="field 'dev' = .* escapes the data roots"):
        load_target_spec(_spec(tmp_path, dev), [data])


def test_target_paths_inside_the_data_roots_resolve(roots):
    tmp_path, data, _ = roots
    for dev in ("mine/dev.jsonl", str(data / "mine" / "dev.jsonl"), "mine/./../mine/dev.jsonl"):
        spec = load_target_spec(_spec(tmp_path, dev), [data])
        assert spec.dev == (data / "mine" / "dev.jsonl").resolve()
