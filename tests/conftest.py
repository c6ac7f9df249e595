"""Tests run offline on CPU with tiny models cached in a per-session directory."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets its share of the cores (at most 2 threads); processes a test starts inherit it.
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(_THREADS)


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


def _tiny_recipe(**stage_optim) -> dict:
    """A tiny two-stage recipe (tiny encoder/LLM from mllm_kit.tiny, synthetic data), as a recipe dict."""
    from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

    optim = {"lr": 1e-3, "global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, **stage_optim}
    return {
        "name": "tiny",
        "model": {"encoder": tiny_encoder_spec("clip"), "connector": "mlp2x_gelu", "llm": tiny_llm_spec("llama")},
        "data": {"template": "chatml", "max_length": 256, "eval": "synthetic:eval",
                 "synthetic": {"num_align": 24, "num_sft": 24, "num_eval": 12, "image_size": 64}},
        "optim": optim,
        "trainer": {"progress": False, "log_every_n_steps": 1, "checkpoint_every_n_steps": 1},
        "eval": {"max_new_tokens": 3, "batch_size": 6},
        "stages": [
            {"name": "align", "trainable": ["connector"], "data": {"train": "synthetic:align", "template": "plain"}},
            {"name": "sft", "trainable": ["connector", "llm"], "data": {"train": "synthetic:sft"}},
        ],
    }


@pytest.fixture
def tiny_recipe():
    return _tiny_recipe


@pytest.fixture(scope="session")
def real_tokenizer(tmp_path_factory):
    """``real_tokenizer(name)`` → a real tokenizer (``tests/real_tokenizers.py``: mistral_v1, mistral_v3, tekken, qwen),
    built offline from test-only packages once per session, saved and loaded back with ``AutoTokenizer``.
    Instances are shared across tests: do not modify them."""
    from real_tokenizers import load_real_tokenizer

    root = tmp_path_factory.mktemp("real_tokenizers")
    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_real_tokenizer(name, root)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished run directory of the tiny two-stage recipe (2 steps per stage), shared by the inference tests;
    they must not write into it."""
    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.training.runner import fit

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    fit(recipe_from_dict(_tiny_recipe()), run)
    return run
