import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `precision: auto` would mean bf16 on some CI machines and fp32 on others: the suite's tolerances assume fp32.
os.environ.setdefault("LMREFINERY_AUTO_PRECISION", "fp32")

from tests.tiny import save_tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _own_cache_root(tmp_path_factory):
    """Tokenised pools cached by the suite go to a temporary directory, not the user's cache."""
    if "LMREFINERY_CACHE" not in os.environ:
        os.environ["LMREFINERY_CACHE"] = str(tmp_path_factory.mktemp("lmrefinery-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
