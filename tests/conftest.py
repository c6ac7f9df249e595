"""Tests run offline on CPU with tiny models cached in a per-session directory."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Tiny models go to a fresh cache so tests never depend on what a previous run left behind."""
    root = tmp_path_factory.mktemp("mllm_kit_cache")
    old = os.environ.get("MLLM_KIT_CACHE")
    os.environ["MLLM_KIT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MLLM_KIT_CACHE", None)
    else:
        os.environ["MLLM_KIT_CACHE"] = old
