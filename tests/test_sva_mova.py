"""Cambrian's SVA and MoVA's MoV-Adapter (specs/components.md §5.3, §5.4): shapes, window locality, inside-LLM
re-aggregation, zero-initialised branches, top-k gating, the instruction context."""

import pytest
import torch
from PIL import Image

from mllm_kit import MLLM
from mllm_kit.batch import Batch
from mllm_kit.config import resolve_model
from mllm_kit.connectors.mova import rope_2d, rotate_pairs
from mllm_kit.connectors.sva import windows
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import CONNECTORS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

D = 40


def feats(*shapes, n=2, seed=0):
    """One VisualFeatures per ``(rows, cols, C)``."""
    g = torch.Generator().manual_seed(seed)
    return [VisualFeatures(hidden_states=(torch.randn(n, h * w, c, generator=g),), grid=(h, w), selected_layer=0)
            for h, w, c in shapes]


def with_map(f, x):
    return VisualFeatures(hidden_states=(x,), grid=f.grid, selected_layer=0)


def train(module, loss_fn, steps=1, lr=0.1):
    """Plain SGD steps (torch.optim's first step imports ~900 modules: seconds on a small CPU)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss_fn().backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= lr * p.grad


# -- SVA ------------------------------------------------------------------------------------------------------------

SVA_SHAPES = ((2, 2, 16), (8, 8, 24))  # query side 2: a 1-token window and a 4×4 = 16-token window (Cambrian: 24 vs 96)


def rewrites(out):
    """``{layer: fn}`` of a connector output's rewrite steps."""
    return {step.layer: step.fn for step in out.steps}


def sva(**options):
    torch.manual_seed(0)
    spec = {"name": "sva", "query_side": 2, "hidden": 32, "num_layers": 2, "heads": 2, **options}
    return CONNECTORS.build(spec, in_dims=[16, 24], out_dim=D, grids=[(2, 2), (8, 8)])


def test_sva_shapes_token_counts_and_newline():
    conn = sva()
    assert conn.window_sizes == [1, 16]
    assert list(conn.samplers[0][0].pos_embed.keys()) == ["1"]  # only windows of > 1 token get a position embedding
    assert conn.samplers[0][0].pos_embed["1"].shape == (16, 32)
    out = conn(feats(*SVA_SHAPES)).tokens
    assert out.shape == (2, 4, D) and conn.num_tokens(999, (7, 7)) == 4
    lined = sva(newline=True)
    out = lined(feats(*SVA_SHAPES)).tokens
    assert out.shape == (2, 6, D) and lined.num_tokens(0, (1, 1)) == 6
    assert torch.equal(out[:, 2], lined.image_newline.detach().expand(2, D))  # after each query row
    assert torch.equal(out[:, 5], lined.image_newline.detach().expand(2, D))
    groups = sva(num_query_groups=2)
    assert groups.readout[0].in_features == 64 and groups(feats(*SVA_SHAPES)).tokens.shape == (2, 4, D)


def test_windows_gather_the_tokens_under_each_query_cell():
    x = torch.arange(8 * 8, dtype=torch.float32).view(1, 64, 1)  # the token's row-major index
    w = windows(x, (8, 8), 2)  # [4 cells, 16, 1]
    assert w.shape == (4, 16, 1)
    rows, cols = torch.div(w[..., 0], 8, rounding_mode="floor"), w[..., 0] % 8
    for cell in range(4):
        u, v = divmod(cell, 2)
        assert set(rows[cell].tolist()) == {4 * u + i for i in range(4)} and set(cols[cell].tolist()) == {4 * v + i for i in range(4)}
    assert windows(torch.arange(6 * 4.0).view(1, 24, 1), (6, 4), 2).shape == (4, 6, 1)  # rectangular: 3×2 windows


def test_each_query_sees_only_its_own_window():
    conn = sva().eval()
    base, fine = feats(*SVA_SHAPES)
    out = conn([base, fine]).tokens
    changed = fine.selected.clone().view(2, 8, 8, 24)
    changed[:, 4:, :4] += 3.0  # member 1's window under query cell (1, 0); the context reads member 0 only
    out2 = conn([base, with_map(fine, changed.view(2, 64, 24))]).tokens
    differs = (out2 - out).abs().amax(dim=(0, 2)) > 1e-6
    assert differs.tolist() == [False, False, True, False]
    # member 0 feeds the global context, so changing it moves every query
    out3 = conn([with_map(base, base.selected + 1.0), fine]).tokens
    assert ((out3 - out).abs().amax(dim=(0, 2)) > 1e-6).all()


def test_sva_rejects_grids_that_do_not_tile_and_cls_tokens():
    with pytest.raises(ConfigError, match=r"member 1 has a 6×6 patch grid.*4×4 query grid"):
        CONNECTORS.build({"name": "sva", "query_side": 4, "hidden": 32, "heads": 2}, in_dims=[16, 24], out_dim=D,
                         grids=[(4, 4), (6, 6)])
    conn = sva()
    base, _ = feats(*SVA_SHAPES)
    with_cls = VisualFeatures(hidden_states=(torch.randn(2, 65, 24),), grid=(8, 8), selected_layer=0)
    with pytest.raises(ConfigError, match="select_feature: patch"):
        conn([base, with_cls])
    with pytest.raises(ConfigError, match="newline"):
        sva(newline=True, llm_layers=[0])
    with pytest.raises(ConfigError, match="heads"):
        sva(heads=5)


def test_reaggregation_rewrites_read_their_own_forward_s_windows():
    conn = sva(llm_layers=[0, 3]).eval()
    assert sorted(conn.reaggregators.keys()) == ["0", "3"] and conn.reaggregators["0"].proj_in.in_features == D + 32
    hidden = torch.randn(2 * 4, D)
    base, fine = feats(*SVA_SHAPES)
    first = rewrites(conn([base, fine]))
    assert sorted(first) == [0, 3] and conn(feats(*SVA_SHAPES)).tokens.shape == (2, 4, D)
    a = first[3](hidden)
    assert a.shape == (8, D) and not torch.allclose(a, hidden)
    changed = fine.selected.clone().view(2, 8, 8, 24)
    changed[:, :4, 4:] += 3.0  # the window under cell (0, 1)
    b = rewrites(conn([base, with_map(fine, changed.view(2, 64, 24))]))[3](hidden)
    assert ((b - a).view(2, 4, D).abs().amax(dim=(0, 2)) > 1e-6).tolist() == [False, True, False, False]
    torch.testing.assert_close(first[3](hidden), a, rtol=0, atol=0)  # a later forward leaves earlier rewrites alone
    with pytest.raises(ConfigError, match=r"\[8, 40\]"):
        first[0](hidden[:7])
    assert sva()(feats(*SVA_SHAPES)).steps == ()


def test_sva_trains_every_parameter():
    conn = sva(llm_layers=[0])
    features = feats(*SVA_SHAPES)

    def loss():
        out = conn(features)
        return rewrites(out)[0](out.tokens.reshape(-1, D)).pow(2).mean()

    train(conn, loss, steps=2, lr=1e-2)
    assert [name for name, p in conn.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_cambrian_recipe_gives_every_sva_layer_the_sampler_lr_and_the_projectors_the_base_lr():
    """Cambrian's create_optimizer (cambrian/train/cambrian_trainer.py) gives ``mm_vision_sampler_lr`` (1e-4) to every
    parameter whose name holds "vision_sampler" or "vision_query": the SVA layers (``vision_sampler_<g>``), the layers
    inside the LLM (``vision_sampler_layers``) and the queries; the adapters (``mm_projector_aux_<i>``) and the output MLP
    (``mm_projector``) train at ``learning_rate`` (1e-3). The recipe's align stage, resolved into optimiser groups."""
    from mllm_kit.config import load_recipe, smoke_recipe
    from mllm_kit.training.optim import param_groups
    from mllm_kit.training.trainable import apply_trainable

    recipe = smoke_recipe(load_recipe("cambrian"))
    align = recipe.stage("align")
    model = MLLM.build(recipe.model)
    assert list(model.connector.reaggregators) == ["0"]  # --smoke keeps one inside-LLM layer
    apply_trainable(model, align.trainable)
    lr = {name: group["lr"] for group in param_groups(model, align.optim) for name in group["names"]}
    assert set(lr) == {name for name, p in model.named_parameters() if p.requires_grad}
    sampler = ("connector.samplers.", "connector.reaggregators.", "connector.queries")
    inside = [name for name in lr if name.startswith("connector.reaggregators.")]
    assert inside and all(lr[name] == 1e-4 for name in inside), {name: lr[name] for name in inside}
    assert {lr[name] for name in lr if name.startswith(sampler)} == {1e-4}
    assert {lr[name] for name in lr if not name.startswith(sampler)} == {1e-3}
    assert {name.split(".")[1] for name in lr if lr[name] == 1e-3} == {"adapters", "readout"}


def sva_model():
    torch.manual_seed(0)
    clip, dino = {**tiny_encoder_spec("clip"), "select_layer": -2}, {**tiny_encoder_spec("dinov2", image_size=48), "select_layer": -1}
    spec = resolve_model({"name": "mixture", "members": {"clip": clip, "dino": dino}},
                         {"name": "sva", "query_side": 2, "hidden": 32, "num_layers": 1, "heads": 2, "llm_layers": [0]},
                         tiny_llm_spec("llama"))
    model = MLLM.build(spec).eval()
    n, img = model.tokens_per_image(), model.image_token_id
    ids = torch.tensor([[5, *[img] * n, 6, 7], [8, 9, *[img] * n, 10]])
    g = torch.Generator().manual_seed(1)
    pixels = torch.stack([model.encoder.image_transform(Image.fromarray(
        torch.randint(0, 255, (40, 50, 3), generator=g, dtype=torch.uint8).numpy())) for _ in range(2)])
    return model, ids, pixels


def _batch(ids, pixels, n):
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, images_per_sample=[1] * len(ids),
                 num_image_tokens=len(ids) * n)


def test_sva_rewrites_the_image_positions_after_each_listed_llm_layer():
    """Cambrian's ``cambrian_llama.py``: after decoder layer 0, h[image] = reaggregate(h[image]); nothing else moves."""
    model, ids, pixels = sva_model()
    n, layers = model.tokens_per_image(), model.llm.decoder_layers
    seen = {}
    handles = [layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out.clone()), prepend=True),
               layers[1].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("next", (a[0] if a else k["hidden_states"]).clone()),
                                                   with_kwargs=True)]
    try:
        with torch.no_grad():
            model(_batch(ids, pixels, n))
            out = model.encode_images(pixels)
    finally:
        for h in handles:
            h.remove()
    image = ids == model.image_token_id
    assert torch.equal(seen["next"][~image], seen["raw"][~image])
    torch.testing.assert_close(seen["next"][image], rewrites(out)[0](seen["raw"][image]), rtol=1e-5, atol=1e-6)
    assert (seen["next"][image] - seen["raw"][image]).abs().max() > 1e-3


def test_sva_generation_rewrites_in_prefill_only_and_equals_decoding_without_a_cache():
    model, ids, pixels = sva_model()
    n = model.tokens_per_image()
    generated = model.generate(ids, torch.ones_like(ids), pixel_values=pixels, max_new_tokens=4, stop_token_ids=[-1])
    assert not any(layer._forward_hooks for layer in model.llm.decoder_layers)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(_batch(seq, pixels, n)).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq[:, ids.shape[1]:])


def test_sva_re_aggregators_get_gradients_also_from_text_only_batches():
    """Every rank must touch the same parameters under DDP/FSDP: a text-only batch still reaches the re-aggregators."""
    model, ids, pixels = sva_model()
    model.train()
    text = torch.tensor([[5, 6, 7, 8]])
    for batch in (_batch(ids, pixels, model.tokens_per_image()), Batch(input_ids=text, attention_mask=torch.ones_like(text))):
        model.zero_grad()
        model(batch).logits.float().pow(2).mean().backward()
        grads = [p.grad for p in model.connector.reaggregators.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads) == (batch.pixel_values is not None)


# -- MoVA -----------------------------------------------------------------------------------------------------------

MOVA_SHAPES = ((4, 4, 16), (8, 8, 24), (2, 2, 8))  # base CLIP 4×4, experts at 8×8 and 2×2 (resized to 4×4)


def mova(**options):
    torch.manual_seed(0)
    spec = {"name": "mova", "num_layers": 2, "heads": 2, "top_k": 1, **options}
    return CONNECTORS.build(spec, in_dims=[16, 24, 8], out_dim=D, grids=[(4, 4), (8, 8), (2, 2)])


def context(seed=3, n=2):
    return torch.randn(n, 5, D, generator=torch.Generator().manual_seed(seed)), torch.ones(n, 5, dtype=torch.bool)


def run(conn, features, seed=3):
    return conn(features, text_context=context(seed)).tokens


def test_mova_shapes_and_token_count():
    conn = mova()
    assert conn.num_tokens(0, (1, 1)) == 4 and run(conn, feats(*MOVA_SHAPES)).shape == (2, 4, D)  # half the base side
    conn = mova(output_side=1)
    assert conn.num_tokens(0, (1, 1)) == 1 and run(conn, feats(*MOVA_SHAPES)).shape == (2, 1, D)
    assert conn.blocks[0].gate[0].in_features == D + 16  # [instruction ‖ mean(x)]
    with pytest.raises(ConfigError, match="top_k=3"):
        mova(top_k=3)


def test_mova_starts_as_the_base_path_and_learns_to_use_its_experts():
    conn = mova()
    base, dino, sam = feats(*MOVA_SHAPES)
    other = feats(*MOVA_SHAPES, seed=9)
    a = run(conn, [base, dino, sam])
    assert torch.equal(a, run(conn, [base, other[1], other[2]]))  # zero-initialised branches: experts unused at init
    pooled = torch.nn.functional.adaptive_avg_pool2d(base.selected.transpose(1, 2).reshape(2, 16, 4, 4), 2)
    assert torch.allclose(a, conn.readout(pooled.flatten(2).transpose(1, 2)), atol=1e-6)  # (x + pos + r)/2 = base
    train(conn, lambda: run(conn, [base, dino, sam]).pow(2).mean(), steps=1, lr=0.5)
    assert not torch.allclose(run(conn, [base, dino, sam]), run(conn, [base, other[1], other[2]]))


def test_mova_trains_every_parameter():
    conn = mova(top_k=2)
    features = feats(*MOVA_SHAPES)
    train(conn, lambda: run(conn, features).pow(2).mean(), steps=3, lr=0.5)
    assert [name for name, p in conn.named_parameters() if p.grad is None] == []
    assert all(p.grad.abs().sum() > 0 for name, p in conn.named_parameters() if "cross_attn.0" in name)


def test_mova_gates_are_top_k_renormalised_and_respect_the_coarse_mask():
    conn = mova(top_k=1, num_layers=1)
    for seed in range(3):  # a trained gate: its zero-initialised last layer made random
        torch.manual_seed(seed)
        torch.nn.init.normal_(conn.blocks[0].gate[-1].weight, std=2.0)
        w = conn(feats(*MOVA_SHAPES), text_context=context(seed)).routing[0]  # [n_img, E]
        assert ((w > 0).sum(-1) == 1).all() and torch.allclose(w.sum(-1), torch.ones(2))
    wide = mova(top_k=2, num_layers=1)
    torch.nn.init.normal_(wide.blocks[0].gate[-1].weight, std=2.0)
    out = wide(feats(*MOVA_SHAPES), text_context=context())
    w = out.routing[0]
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(2))
    assert torch.allclose(out.metrics["mova_gate"], w.mean(0)) and out.metrics["mova_gate"].shape == (2,)
    masked = mova(top_k=2, coarse_mask=[1, 0])
    torch.nn.init.normal_(masked.blocks[0].gate[-1].weight, std=2.0)
    out = masked(feats(*MOVA_SHAPES), text_context=context())
    assert (out.routing[..., 1] == 0).all() and torch.allclose(out.routing[..., 0], torch.ones(2, 2, 2)[..., 0])
    assert out.metrics["mova_gate"].tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="coarse_mask"):
        mova(coarse_mask=[0, 0])


def test_mova_needs_this_forward_s_instruction():
    conn = mova()
    features = feats(*MOVA_SHAPES)
    with pytest.raises(ConfigError, match="text_context"):
        conn(features)
    with pytest.raises(ConfigError, match="3 context rows for 2 images"):
        conn(features, text_context=context(n=3))
    # the gate reads the masked mean of the instruction: padding outside the mask does not matter
    embeds, mask = torch.randn(2, 5, D), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    first = conn.instruction((embeds, mask), 2)
    embeds[0, 3:] = 100.0
    assert torch.equal(conn.instruction((embeds, mask), 2), first) and torch.allclose(first[0], embeds[0, :3].mean(0))
    assert type(conn).reads_instruction is True


def test_mova_rotary_embedding_depends_on_relative_offsets_only():
    cos, sin = rope_2d((5, 5), 8)
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda t, i: t * cos[i] + rotate_pairs(t) * sin[i]
    at = lambda r, c: r * 5 + c
    score = lambda p, s: rot(q, p) @ rot(k, s)
    assert torch.allclose(score(at(0, 0), at(1, 2)), score(at(2, 1), at(3, 3)), atol=1e-5)
    assert not torch.allclose(score(at(0, 0), at(1, 2)), score(at(0, 0), at(2, 1)), atol=1e-3)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(rotate_pairs(torch.tensor([1.0, 2, 3, 4])), torch.tensor([-2.0, 1, -4, 3]))


def test_both_run_inside_the_model_and_mova_reads_each_image_s_instruction():
    from PIL import Image

    from mllm_kit import MLLM
    from mllm_kit.batch import Batch
    from mllm_kit.config import resolve_model
    from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

    enc = {"name": "mixture", "members": {"clip": tiny_encoder_spec("clip"), "dino": tiny_encoder_spec("dinov2")}}
    from mllm_kit.config.smoke import tiny_connector_like

    for spec in (tiny_connector_like({"name": "mova"}), tiny_connector_like({"name": "sva", "llm_layers": [0, 3]})):
        torch.manual_seed(0)
        model = MLLM.build(resolve_model(enc, spec, tiny_llm_spec("llama")))
        assert model.reads_instruction == (spec["name"] == "mova") and model.tokens_per_image() == 4
        n, img = model.tokens_per_image(), model.image_token_id
        ids = torch.tensor([[5, *[img] * n, 6, *[img] * n, 7], [8, *[img] * n, 9, 10, 11, 12, 13, 14]])
        pixels = torch.stack([model.encoder.image_transform(Image.new("RGB", (20, 20), (k * 60, 0, 0))) for k in range(3)])
        batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, images_per_sample=[2, 1],
                      num_image_tokens=3 * n, labels=ids)
        out = model(batch)
        assert out.hidden.shape[:2] == ids.shape
        assert ("mova_gate_e0" in out.metrics) == (spec["name"] == "mova")
        assert spec.get("llm_layers") == (None if spec["name"] == "mova" else [0])  # smoke keeps re-aggregation, in layer 0
