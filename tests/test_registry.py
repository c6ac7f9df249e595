"""Registries: exact names, clear errors, ``_target_`` user classes, and a user connector end to end."""

from __future__ import annotations

import uuid

import pytest
import torch

from mllm_kit import MLLM, Batch
from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.connectors.mlp import IdentityConnector, LinearConnector, MLPConnector
from mllm_kit.encoders.hf import CLIPEncoder, DINOv2Encoder, SigLIPEncoder
from mllm_kit.encoders.timm_vit import TimmVisionEncoder
from mllm_kit.errors import ConfigError, RegistryError
from mllm_kit.llm.hf import HFCausalLM
from mllm_kit.registry import CONNECTORS, ENCODERS, LLMS, TEMPLATES, Registry
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.config import resolve_model

SCALED = f"{__name__}.ScaledMLP"


# -- user components defined in the test module (referenced by _target_) ------------------------
class ScaledMLP(MLPConnector):
    """The plain MLP connector with its output multiplied by ``scale``."""

    def __init__(self, in_dims, out_dim, depth: int = 2, act: str = "gelu", scale: float = 1.0) -> None:
        super().__init__(in_dims, out_dim, depth=depth, act=act)
        self.scale = scale

    def forward(self, features, text_context=None) -> ConnectorOutput:
        out = super().forward(features, text_context)
        return ConnectorOutput(tokens=out.tokens * self.scale)


class KwargsConnector(Connector):
    """A user connector that forwards extra options through ``**options``."""

    def __init__(self, in_dims, out_dim, **options) -> None:
        super().__init__(in_dims, out_dim)
        self.options = options
        self.proj = torch.nn.Linear(self.in_dims[0], self.out_dim)

    def forward(self, features, text_context=None) -> ConnectorOutput:
        return ConnectorOutput(tokens=self.proj(features[0].selected))


class NotAConnector:
    def __init__(self, in_dims, out_dim) -> None:
        self.in_dims = in_dims


# -- exact-name lookup --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("registry", "name", "expected"),
    [
        (CONNECTORS, "mlp", MLPConnector),
        (CONNECTORS, "linear", LinearConnector),
        (CONNECTORS, "identity", IdentityConnector),
        (ENCODERS, "hf_clip", CLIPEncoder),
        (ENCODERS, "hf_siglip", SigLIPEncoder),
        (ENCODERS, "hf_dinov2", DINOv2Encoder),
        (ENCODERS, "timm", TimmVisionEncoder),
        (LLMS, "hf_causal_lm", HFCausalLM),
    ],
)
def test_exact_name_lookup(registry, name, expected):
    assert registry.get(name) is expected
    assert name in registry
    assert name in registry.names()


def test_builtin_names_are_registered_and_sorted():
    assert {"identity", "linear", "mlp"} <= set(CONNECTORS.names())
    assert {"hf_clip", "hf_dinov2", "hf_siglip", "timm"} <= set(ENCODERS.names())
    assert "hf_causal_lm" in LLMS.names()
    assert {"chatml", "hf", "llama3", "phi3", "plain", "vicuna_v1"} <= set(TEMPLATES.names())
    for registry in (CONNECTORS, ENCODERS, LLMS, TEMPLATES):
        assert registry.names() == sorted(registry.names())
        assert len(registry) == len(registry.names())


@pytest.mark.parametrize("near_miss", ["MLP", "mlp ", " mlp", "Mlp"])
def test_lookup_is_exact_not_fuzzy(near_miss):
    with pytest.raises(RegistryError) as info:
        CONNECTORS.get(near_miss)
    assert f"unknown connector {near_miss!r}" in str(info.value)


# -- unknown names ------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names_and_suggests_closest():
    with pytest.raises(RegistryError) as info:
        CONNECTORS.get("mlpp")
    msg = str(info.value)
    assert "unknown connector 'mlpp'" in msg
    assert "Did you mean 'mlp'?" in msg
    assert f"Valid connectors: {', '.join(CONNECTORS.names())}." in msg
    assert "identity, linear, matryoshka, mlp" in msg
    assert "_target_" in msg, "the error should tell users how to name their own class"


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(RegistryError) as info:
        ENCODERS.get("zzzzzz")
    msg = str(info.value)
    assert "Did you mean" not in msg
    assert f"Valid encoders: {', '.join(ENCODERS.names())}." in msg


def test_registry_error_is_a_keyerror_with_a_readable_message():
    with pytest.raises(KeyError) as info:
        CONNECTORS.get("mlpp")
    # KeyError.__str__ would wrap the message in quotes; ours must not.
    assert str(info.value).startswith("unknown connector")


def test_unknown_name_in_empty_registry_says_none():
    with pytest.raises(RegistryError, match=r"Valid widgets: \(none\)"):
        Registry("widget").get("anything")


# -- duplicates and decorator registration ------------------------------------------------------
def test_decorator_registers_into_fresh_registry():
    reg: Registry = Registry("x", base=Connector)

    @reg.register("scaled")
    class Scaled(ScaledMLP):
        pass

    assert reg.get("scaled") is Scaled
    assert "scaled" in reg and len(reg) == 1 and reg.names() == ["scaled"]
    assert reg.origin("scaled") == __name__  # where it was registered from (a plugin says which)
    conn = reg.build({"name": "scaled", "scale": 2.5, "depth": 1}, in_dims=[8], out_dim=4)
    assert isinstance(conn, Scaled)
    assert conn.scale == 2.5 and conn.in_dims == (8,) and conn.out_dim == 4
    assert len(conn.mlp) == 1, "depth=1 must give a single Linear"
    assert "scaled" not in CONNECTORS, "a fresh registry must not leak into the global one"


def test_duplicate_registration_names_both_classes():
    reg: Registry = Registry("widget")

    @reg.register("w")
    class First:
        pass

    class Second:
        pass

    with pytest.raises(RegistryError) as info:
        reg.register("w")(Second)
    msg = str(info.value)
    assert "widget 'w' is already registered" in msg
    assert f"{__name__}.test_duplicate_registration_names_both_classes.<locals>.First" in msg
    assert f"{__name__}.test_duplicate_registration_names_both_classes.<locals>.Second" in msg
    assert reg.get("w") is First, "a rejected registration must not replace the first one"


def test_reregistering_the_same_object_is_idempotent():
    reg: Registry = Registry("widget")

    class A:
        pass

    reg.register("a")(A)
    assert reg.register("a")(A) is A
    assert len(reg) == 1


@pytest.mark.parametrize("bad", ["", None, 3])
def test_registration_name_must_be_nonempty_string(bad):
    with pytest.raises(RegistryError, match="non-empty strings"):
        Registry("widget").register(bad)


def test_duplicate_of_builtin_in_global_registry_is_rejected():
    with pytest.raises(RegistryError, match="connector 'mlp' is already registered by mllm_kit.connectors.mlp.MLPConnector"):
        CONNECTORS.register("mlp")(ScaledMLP)
    assert CONNECTORS.get("mlp") is MLPConnector


@pytest.fixture
def global_scaled_name():
    """A unique name registered into the global CONNECTORS registry, removed afterwards."""
    name = f"test_scaled_{uuid.uuid4().hex[:8]}"
    CONNECTORS.register(name)(ScaledMLP)
    yield name
    CONNECTORS._entries.pop(name, None)


def test_global_registration_by_name_builds(global_scaled_name):
    conn = CONNECTORS.build({"name": global_scaled_name, "scale": 0.5}, in_dims=[6], out_dim=3)
    assert type(conn) is ScaledMLP and conn.scale == 0.5


# -- _target_ -----------------------------------------------------------------------------------
def test_target_resolves_user_class():
    cls, kwargs = CONNECTORS.resolve({"_target_": SCALED, "scale": 2.0})
    assert cls is ScaledMLP
    assert kwargs == {"scale": 2.0}


def test_dotted_name_in_get_imports_the_class():
    assert CONNECTORS.get(SCALED) is ScaledMLP


def test_string_spec_resolves_with_no_options():
    assert CONNECTORS.resolve("linear") == (LinearConnector, {})


def test_target_with_missing_attribute_suggests_closest():
    with pytest.raises(RegistryError) as info:
        CONNECTORS.resolve({"_target_": f"{__name__}.ScaledMPL"})
    msg = str(info.value)
    assert f"module {__name__!r} has no attribute 'ScaledMPL'" in msg
    assert "Did you mean 'ScaledMLP'?" in msg


def test_target_with_missing_module():
    with pytest.raises(RegistryError, match="cannot import module 'no_such_pkg_xyz.sub'"):
        CONNECTORS.resolve({"_target_": "no_such_pkg_xyz.sub.Thing"})


def test_target_must_be_dotted():
    with pytest.raises(RegistryError, match="'ScaledMLP' is not a dotted path"):
        CONNECTORS.resolve({"_target_": "ScaledMLP"})


def test_spec_with_both_name_and_target_is_rejected():
    with pytest.raises(RegistryError, match="both name='mlp' and _target_="):
        CONNECTORS.resolve({"name": "mlp", "_target_": SCALED})


def test_spec_without_name_or_target_lists_names():
    with pytest.raises(RegistryError) as info:
        CONNECTORS.resolve({"depth": 2})
    msg = str(info.value)
    assert f"needs 'name' (one of: {', '.join(CONNECTORS.names())}) or '_target_'" in msg
    assert "['depth']" in msg


def test_build_checks_base_class():
    reg: Registry = Registry("connector", base=Connector)
    with pytest.raises(RegistryError, match="built NotAConnector, which is not a Connector"):
        reg.build({"_target_": f"{__name__}.NotAConnector"}, in_dims=[4], out_dim=4)


# -- option checking ----------------------------------------------------------------------------
def test_unknown_option_names_key_and_suggests():
    with pytest.raises(RegistryError) as info:
        CONNECTORS.build({"name": "mlp", "detph": 2}, in_dims=[8], out_dim=4)
    msg = str(info.value)
    assert "connector 'mlp': unknown option 'detph'." in msg
    assert "Did you mean 'depth'?" in msg
    assert "Valid options: depth, act, bias, expand." in msg, "options mllm-kit supplies must not be listed as valid"


def test_unknown_option_on_user_target_suggests():
    with pytest.raises(RegistryError, match=r"unknown option 'scael'\. Did you mean 'scale'\?"):
        CONNECTORS.build({"_target_": SCALED, "scael": 2.0}, in_dims=[8], out_dim=4)


def test_option_supplied_by_mllm_kit_is_rejected():
    with pytest.raises(RegistryError, match="connector 'mlp': option 'in_dims' is set by mllm-kit itself"):
        CONNECTORS.build({"name": "mlp", "in_dims": [99]}, in_dims=[8], out_dim=4)


def test_option_supplied_by_mllm_kit_is_rejected_for_kwargs_constructor():
    with pytest.raises(RegistryError, match="option 'out_dim' is set by mllm-kit itself"):
        CONNECTORS.build({"_target_": f"{__name__}.KwargsConnector", "out_dim": 7}, in_dims=[8], out_dim=4)


def test_kwargs_constructor_receives_free_options():
    conn = CONNECTORS.build({"_target_": f"{__name__}.KwargsConnector", "anything": 1}, in_dims=[8], out_dim=4)
    assert conn.options == {"anything": 1} and conn.proj.in_features == 8 and conn.proj.out_features == 4


# -- a user connector end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_and_scaled():
    enc, llm = tiny_encoder_spec("clip"), tiny_llm_spec("llama")
    plain = MLLM.build(resolve_model(enc, {"name": "mlp", "depth": 2}, llm)).eval()
    scaled = MLLM.build(resolve_model(enc, {"_target_": SCALED, "depth": 2, "scale": 3.0}, llm)).eval()
    scaled.connector.load_state_dict(plain.connector.state_dict())
    return plain, scaled


def _image_batch(model: MLLM, n_text: int = 5) -> Batch:
    n = model.tokens_per_image()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(20, 300, (2, n_text), generator=g)
    img = torch.full((2, n), model.image_token_id)
    ids = torch.cat([text[:, :2], img, text[:, 2:]], dim=1)
    return Batch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(2, 3, 32, 32, generator=g),
        images_per_sample=[1, 1],
        num_image_tokens=2 * n,
    )


def test_user_target_connector_builds_inside_mllm(plain_and_scaled):
    _, scaled = plain_and_scaled
    assert type(scaled.connector) is ScaledMLP
    assert scaled.connector.scale == 3.0
    assert scaled.connector.in_dims == (scaled.encoder.embed_dim,)
    assert scaled.connector.out_dim == scaled.llm.hidden_size


def test_user_target_connector_forward_scales_visual_tokens(plain_and_scaled):
    plain, scaled = plain_and_scaled
    batch = _image_batch(plain)
    vocab = plain.llm.model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        out_plain = plain(batch)
        out_scaled = scaled(batch)
        emb_plain, _ = plain.embed_inputs(batch)
        emb_scaled, _ = scaled.embed_inputs(batch)
    assert out_scaled.logits.shape == (2, batch.input_ids.shape[1], vocab)
    mask = batch.input_ids == plain.image_token_id
    torch.testing.assert_close(emb_scaled[mask], 3.0 * emb_plain[mask])
    torch.testing.assert_close(emb_scaled[~mask], emb_plain[~mask])
    # Text before the image sees no visual token (causal), text after it does.
    torch.testing.assert_close(out_scaled.logits[:, :2], out_plain.logits[:, :2])
    assert (out_scaled.logits[:, -1] - out_plain.logits[:, -1]).abs().max() > 1e-4


def test_supplied_option_rejected_through_mllm_build():
    with pytest.raises(RegistryError, match="option 'in_dims' is set by mllm-kit itself"):
        MLLM.build(tiny_encoder_spec("clip"), {"name": "mlp", "in_dims": [64]}, tiny_llm_spec("llama"))
    with pytest.raises(ConfigError, match=r"model\.connector: option 'in_dims' is set by mllm-kit itself"):  # and at recipe load
        resolve_model(tiny_encoder_spec("clip"), {"name": "mlp", "in_dims": [64]}, tiny_llm_spec("llama"))
