"""Regression tests: the all-too-long error's counts, synthetic radius vs image_size, and silent HF progress bars."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from mllm_kit.config.validate import validate
from mllm_kit.data import LlavaDataset, load_records
from mllm_kit.data.synthetic import SynthConfig, generate, parse_radius
from mllm_kit.data.templates import get_template
from mllm_kit.data.conversation import ConversationEncoder
from mllm_kit.data.transforms import HALF, ImageTransform
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.log import get_logger
from mllm_kit.tiny import tiny_llm, tiny_tokenizer


# -- 1. every sample over max_length --------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer())
    return ConversationEncoder(tok, get_template("chatml"), tok.convert_tokens_to_ids("<image>"), 4)


@pytest.fixture
def quiet():
    """Each dropped sample logs a warning; these tests drop dozens."""
    logger = logging.getLogger("mllm_kit")
    logger.disabled = True
    yield
    logger.disabled = False


def text_file(path: Path, n: int) -> Path:
    records = [{"id": f"s{i}", "conversations": [{"from": "human", "value": "why " * (i + 1)},
                                                 {"from": "gpt", "value": "because"}]} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def too_long(path: Path, encoder, truncation: str, index: int) -> tuple[str, list[int]]:
    lengths = [len(encoder.encode(r.turns)) for r in load_records(path)]
    ds = LlavaDataset(path, None, encoder, ImageTransform(size=16, mean=HALF, std=HALF, mode="resize"),
                      max_length=min(lengths) - 1 if truncation == "drop" else 3, truncation=truncation)
    with pytest.raises(DataError) as info:
        ds[index]
    return str(info.value), lengths


def test_all_too_long_reports_the_files_real_counts(tmp_path, encoder, quiet):
    path = text_file(tmp_path / "six.json", 6)
    message, lengths = too_long(path, encoder, "drop", index=2)
    limit = min(lengths) - 1
    assert message.startswith(f"{path}: 6 of 6 consecutive samples from index 2 exceed max_length={limit} "
                              "(every sample in the file)"), message
    assert f"the longest tried has {max(lengths)} tokens" in message
    assert f"data.max_length to at least {max(lengths)}" in message and "truncation: trim" in message
    assert "64" not in message[len(str(path)):]


def test_all_too_long_in_a_big_file_names_how_many_were_tried(tmp_path, encoder, quiet):
    path = text_file(tmp_path / "big.json", 70)
    message, lengths = too_long(path, encoder, "drop", index=10)
    assert "64 of 70 consecutive samples from index 10" in message and "every sample" not in message
    tried = [lengths[(10 + k) % 70] for k in range(64)]  # 10..69, then wrapping round to 0..3
    assert f"the longest tried has {max(tried)} tokens" in message


def test_trim_that_cuts_every_reply_says_so(tmp_path, encoder, quiet):
    path = text_file(tmp_path / "trim.json", 3)
    message, lengths = too_long(path, encoder, "trim", index=0)
    assert "3 of 3 consecutive samples from index 0 exceed max_length=3" in message
    assert "truncation: trim every reply was cut away" in message and f"({max(lengths)} keeps them whole)" in message


# -- 2. synthetic radius follows image_size ------------------------------------------------------
def cache_digest(config: SynthConfig) -> str:
    """How mllm_kit.training.data keys the synthetic cache directory."""
    return hashlib.sha1(json.dumps(config.key(), sort_keys=True).encode()).hexdigest()[:10]


def test_small_image_size_gets_a_proportional_radius(tmp_path):
    config = SynthConfig(image_size=32, num_align=4, num_sft=4, num_eval=4)
    assert config.radius == (4, 8)
    paths = generate(tmp_path / "ds", config)
    images = sorted((paths.image_root / "images").glob("*.png"))
    assert len(images) == 12
    for image in images:
        with Image.open(image) as im:
            assert im.size == (32, 32)


def test_default_config_and_its_cache_key_are_unchanged(tmp_path):
    # Digests of today's configs: cached datasets and measured numbers are keyed by them.
    assert SynthConfig().radius == (8, 16) and SynthConfig() == SynthConfig(radius=(8, 16))
    assert cache_digest(SynthConfig()) == "4e65e08988"
    quickstart = SynthConfig(seed=0, image_size=64, radius=[12, 22], num_align=60, num_sft=60, num_eval=60)
    assert cache_digest(quickstart) == "eac610d53d"
    small = dict(num_align=6, num_sft=6, num_eval=6)
    a, b = generate(tmp_path / "a", SynthConfig(**small)), generate(tmp_path / "b", SynthConfig(radius=(8, 16), **small))
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)


def test_explicit_radius_is_checked_against_the_image_size():
    too_large = r"radius max 16 is too large for image_size 32.*1 <= min <= max <= 15.*default \[4, 8\]"
    with pytest.raises(ConfigError, match=too_large):
        SynthConfig(image_size=32, radius=(8, 16))
    with pytest.raises(ConfigError, match=r"radius min 7 is too large for task 'count'.*min <= 6 \(task 'count'\)"):
        SynthConfig(image_size=32, tasks=("count",), radius=(7, 8))
    with pytest.raises(ConfigError, match=r"radius must be two integers"):
        SynthConfig(radius=8)


def test_radius_from_a_recipe_or_the_command_line():
    from_yaml = validate({"image_size": 32, "radius": [3, 6]}, SynthConfig, "data.synthetic")
    explicit = SynthConfig(image_size=32, radius=(3, 6))
    assert from_yaml == explicit and hash(from_yaml) == hash(explicit) and cache_digest(from_yaml) == cache_digest(explicit)
    assert validate({"image_size": 32}, SynthConfig, "data.synthetic").radius == (4, 8)
    with pytest.raises(ConfigError, match=r"data\.synthetic: .*radius max 16 is too large for image_size 32"):
        validate({"image_size": 32, "radius": [8, 16]}, SynthConfig, "data.synthetic")
    assert parse_radius("4,8") == (4, 8) and parse_radius(" 4 , 8 ") == (4, 8)
    for bad in ("8", "a,b", "1,2,3"):
        with pytest.raises(ConfigError, match="MIN,MAX"):
            parse_radius(bad)


# -- 3. transformers' own progress bars ----------------------------------------------------------
BAR_TEXT = ("Loading weights", "Writing model shards", "it/s]", "%|")


@pytest.mark.skipif(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None, reason="the user chose the bars")
def test_save_and_load_print_no_progress_bars(tmp_path, capfd):
    get_logger(__name__)
    source = tiny_llm("llama")
    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(tmp_path / "out")
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    err = capfd.readouterr().err
    assert not [t for t in BAR_TEXT if t in err], err


@pytest.mark.skipif(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None, reason="the user chose the bars")
def test_importing_the_package_silences_hf_bars():
    code = ("import mllm_kit, transformers.utils.logging as t, huggingface_hub.utils as h;"
            "print(t.is_progress_bar_enabled(), h.are_progress_bars_disabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["False", "True"], out.stderr
