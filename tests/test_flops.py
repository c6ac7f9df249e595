"""Closed-form FLOPs (mllm_kit.flops) against torch's FlopCounterMode on tiny models, the peak table and the perf callback.

FlopCounterMode counts what runs: every matmul, convolution and attention kernel of a forward + backward, recomputed
blocks included — so it is compared with ``hardware_flops``; :func:`mllm_kit.flops.measure.measured_flops` counts the
CPU SDPA kernel and convolution gradients by this package's conventions (its docstring says how).

Packed rows: the dense SDPA path on CPU computes every (query, key) score of a row and masks the cross-sample ones,
while mllm_kit.flops counts Σ nᵢ² (what varlen flash attention computes). A packed batch is therefore compared with
its samples run one by one (the same work, each sample attending to itself), and the counter on the packed batch with
the closed form at B·T² pairs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.config import resolve_component, resolve_model
from mllm_kit.config.smoke import tiny_connector_like
from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import Sample
from mllm_kit.data.packing import PackCollator
from mllm_kit.data.transforms import ImageViews
from mllm_kit.flops import (
    CONNECTOR_FLOPS,
    ENCODER_FLOPS,
    FlopCount,
    FlopsUnavailable,
    PartFlops,
    StepFlops,
    Visual,
    register_connector_flops,
    step_flops,
)
from mllm_kit.flops.measure import measured_flops
from mllm_kit.flops.tally import linear
from mllm_kit.objectives.head import head_cross_entropy
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.registry import CONNECTORS, ENCODERS, TRANSFORMS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

# Every closed form equals the counter's total on these models: the relative tolerance only absorbs float rounding
# (docs/performance.md states the same bound).
EXACT = 1e-9


def counted(fn) -> int:
    return measured_flops(fn)


def close(closed: float, measured: float) -> bool:
    return abs(closed - measured) <= EXACT * max(measured, 1.0)


# -- models and batches -------------------------------------------------------------------------------------------
CLIP = {**tiny_encoder_spec("clip"), "select_layer": -2}
DINO = {**tiny_encoder_spec("dinov2", image_size=48), "select_layer": -1}
MIXTURE = {"name": "mixture", "members": {"clip": CLIP, "dino": DINO}}


def build(encoder, connector, llm=None, trainable=("connector", "llm")) -> MLLM:
    torch.manual_seed(0)
    if isinstance(connector, str):
        connector = {"preset": connector}
    spec = resolve_model(encoder, connector, llm or tiny_llm_spec("llama"))
    spec = dataclasses.replace(spec, connector=resolve_component("connectors", tiny_connector_like(spec.connector)))
    model = MLLM.build(spec).train()
    set_trainable(model, trainable)
    return model


def set_trainable(model: MLLM, patterns) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == q or name.startswith(q + ".") or (q.startswith("re:") and q[3:] in name) for q in patterns))


SIZES = [(40, 30), (64, 32), (20, 50)]


def samples(model: MLLM, texts=((3, 4), (2, 9), (5, 3)), images: int = 1) -> list[Sample]:
    """One image per sample (sizes cycle through SIZES), ``(before, after)`` text tokens around it; the last three
    tokens are the reply."""
    g = torch.Generator().manual_seed(1)
    transform = model.make_image_transform()
    out = []
    for k, (before, after) in enumerate(texts):
        w, h = SIZES[k % len(SIZES)]
        pixels, crops, grids, sizes, ids = [], [], [], [], []
        ids += torch.randint(5, 60, (before,), generator=g).tolist()
        n_tokens = 0
        for _ in range(images):
            image = Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            views = transform(image)
            if isinstance(views, ImageViews):
                pixels.append(views.global_view)
                crops.append(views.crops)
                grids.append(views.grid)
            else:
                pixels.append(views)
            sizes.append((w, h))
            n = model.tokens_per_image((w, h)) if model.connector.dynamic_tokens else model.tokens_per_image()
            ids += [model.image_token_id] * n
            n_tokens += n
        ids += torch.randint(5, 60, (after,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (len(ids) - 3) + ids[-3:]
        out.append(Sample(
            input_ids=torch.tensor(ids), labels=torch.tensor(labels), num_image_tokens=n_tokens, id=str(k),
            pixel_values=torch.stack(pixels) if images else None,
            crop_pixel_values=torch.cat(crops) if crops else None, crop_grids=grids, image_sizes=sizes,
            instruction_ids=torch.tensor(ids[:before]) if model.reads_instruction else None,
        ))
    return out


def padded(model: MLLM, **kwargs) -> Batch:
    return PadCollator(model.tokenizer.pad_token_id)(samples(model, **kwargs))


def train_step(model: MLLM, batch: Batch) -> None:
    out = model(batch)
    loss = LMObjective()(out, batch, None)["loss"]
    if loss.requires_grad:
        loss.backward()
    model.zero_grad(set_to_none=True)


def check_step(model: MLLM, batch: Batch) -> FlopCount:
    measured = counted(lambda: train_step(model, batch))
    count = step_flops(model, batch)
    assert close(count.hardware_flops, measured), (count.hardware_flops, measured, count.parts)
    return count


# -- connectors: every family at its preset's smoke sizes ---------------------------------------------------------
FAMILIES = {
    "mlp2x_gelu": (CLIP, "mlp2x_gelu"),
    "linear": (CLIP, "linear"),
    "identity": (CLIP, "identity"),
    "qformer": (CLIP, "qformer"),
    "qformer_light": (CLIP, "qformer_light"),
    "resampler": (CLIP, "resampler"),
    "c_abstractor": (CLIP, "c_abstractor"),
    "dense_dci": (CLIP, "dense_dci"),
    "dense_sci": (CLIP, "dense_sci"),
    "dense_sti": ({**CLIP, "select_layer": -1}, {"preset": "dense_sti", "pool": 4}),
    "moe_mlp": (CLIP, {"preset": "moe_mlp", "top_k": 4}),  # every token to every expert: loads equal, exact
    "deepstack": (CLIP, {"preset": "deepstack", "num_crops": 2, "start": 0}),
    "deepstack_vit": (CLIP, {"preset": "deepstack_vit", "num_crops": 2}),
    "anyres": (CLIP, "anyres"),
    "matryoshka": (CLIP, {"preset": "matryoshka", "scales": None}),
    "eagle_channel_concat": (MIXTURE, "eagle_channel_concat"),
    "prismatic_fused_mlp": (MIXTURE, "prismatic_fused_mlp"),
    "sequence_concat": (MIXTURE, {"name": "sequence_concat", "separator": True}),
    "comm": (MIXTURE, "comm"),
    "mova": (MIXTURE, "mova"),
    "sva": (MIXTURE, {"preset": "sva", "llm_layers": None}),
}


def vision_step(model: MLLM, batch: Batch) -> None:
    """The visual path alone, as the model runs it, with a backward from the visual tokens (and DeepStack's stacks)."""
    context = None
    if getattr(model.connector, "reads_instruction", False):
        text = model.llm.embed(batch.input_ids)
        context = (text, torch.ones(text.shape[:2], dtype=torch.bool))
    out = model.encode_images(batch.pixel_values, context, crop_pixel_values=batch.crop_pixel_values, crop_grids=batch.crop_grids,
                              image_sizes=batch.image_sizes or None)
    loss = out.tokens.sum() + sum(s.values.sum() for s in out.steps if hasattr(s, "values"))
    if loss.requires_grad:
        loss.backward()
    model.zero_grad(set_to_none=True)


def encoder_forward(model: MLLM, batch: Batch) -> None:
    views = batch.pixel_values if batch.crop_pixel_values is None else torch.cat([batch.pixel_values, batch.crop_pixel_values])
    with torch.no_grad():
        model.encoder.features(views)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_connector_flops_match_the_counter(family):
    """The connector alone (the visual path minus the encoder's forward; encoder frozen, connector and LLM trained),
    and the whole training step."""
    encoder, connector = FAMILIES[family]
    model = build(encoder, connector)
    batch = padded(model)
    count = step_flops(model, batch)
    measured = counted(lambda: vision_step(model, batch)) - counted(lambda: encoder_forward(model, batch))
    assert close(count.parts["connector"].hardware, measured), (family, count.parts["connector"], measured)
    if family != "identity":
        assert count.parts["connector"].forward > 0
    check_step(model, batch)


def test_every_registered_connector_and_encoder_has_a_formula():
    missing = [n for n in CONNECTORS.names() if not CONNECTOR_FLOPS.covers(CONNECTORS.get(n))]
    missing += [n for n in ENCODERS.names() if not ENCODER_FLOPS.covers(ENCODERS.get(n))]
    assert not missing


def test_sva_reaggregation_inside_the_llm_and_the_align_stage():
    model = build(MIXTURE, "sva")  # smoke: one re-aggregation after LLM layer 0
    assert model.connector.llm_layers == [0]
    check_step(model, padded(model))
    set_trainable(model, ["connector"])  # alignment: a frozen LLM that gradients pass through
    check_step(model, padded(model))


def test_moe_connector_top_k_below_the_expert_count_counts_the_routed_rows():
    """Top-2 of 4: the closed form counts 2 expert rows per token; the dispatch computes each expert's buffer at the
    largest load, which the counter sees — the difference is exactly the empty buffer rows."""
    model = build(CLIP, "moe_mlp")
    batch = padded(model)
    loads = []
    model.connector.experts.register_forward_hook(lambda m, args, out: loads.append(args[0].shape[:2]))
    measured = counted(lambda: vision_step(model, batch)) - counted(lambda: encoder_forward(model, batch))
    count = step_flops(model, batch).parts["connector"]
    (experts, capacity), = loads
    tokens = batch.num_images * model.tokens_per_image()
    per_row = sum(2 * w.shape[1] * w.shape[2] for w in model.connector.experts.weights)  # forward FLOPs of one row
    padding = (experts * capacity - 2 * tokens) * per_row
    assert padding >= 0
    # forward: the padding rows once; backward: their weight gradients and (after the first layer) input gradients
    first = 2 * model.connector.experts.w0.shape[1] * model.connector.experts.w0.shape[2]
    padding_total = padding + padding + (padding - (experts * capacity - 2 * tokens) * first)
    assert close(count.hardware + padding_total, measured)


# -- encoders ------------------------------------------------------------------------------------------------------
ENCODER_FAMILIES = {
    "clip": CLIP,
    "siglip": tiny_encoder_spec("siglip"),
    "dinov2": DINO,
    "timm_vit": tiny_encoder_spec("timm_vit"),
    "convnext": tiny_encoder_spec("convnext", image_size=64),
    "mixture": MIXTURE,
}


def encoder_step(model: MLLM, batch: Batch, reads) -> None:
    features = model.encoder.features(batch.pixel_values)
    loss = sum(f.hidden_states[r].sum() for f, r in zip(features, reads))
    loss.backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", list(ENCODER_FAMILIES))
def test_encoder_flops_match_the_counter_frozen_and_trained(family, checkpointing):
    connector = {"name": "channel_concat"} if family == "mixture" else "mlp2x_gelu"
    model = build(ENCODER_FAMILIES[family], connector, trainable=("encoder", "connector", "llm"))
    if checkpointing:
        model.enable_activation_checkpointing()
    batch = padded(model)
    reads = [m.selected_layer for m in (model.encoder.members.values() if family == "mixture" else [model.encoder])]
    count = step_flops(model, batch).parts["encoder"]
    assert close(count.hardware, counted(lambda: encoder_step(model, batch, reads))), (family, count)
    assert (count.recompute > 0) == checkpointing
    if not checkpointing:
        set_trainable(model, ["connector"])
        frozen = step_flops(model, batch).parts["encoder"]
        assert frozen.backward == 0 and frozen.forward == count.forward
        with torch.no_grad():
            assert close(frozen.forward, counted(lambda: model.encoder.features(batch.pixel_values)))


def test_an_encoder_block_past_the_read_layer_runs_forward_only():
    """select_layer -2: the last CLIP block is computed (HF runs every layer) but gets no backward."""
    model = build(CLIP, "mlp2x_gelu", trainable=("encoder", "connector", "llm"))
    batch = padded(model)
    trained = step_flops(model, batch).parts["encoder"]
    blocks = model.encoder.num_layers
    n = 17  # 16 patches + CLS
    per_block = 2 * n * (4 * 64 * 64 + 2 * 64 * 128) + 4 * n * n * 64
    patch = 2 * 16 * 3 * 8 * 8 * 64
    assert trained.forward == batch.num_images * (patch + blocks * per_block)
    assert trained.backward == batch.num_images * (patch + (blocks - 1) * 2 * per_block)


# -- the LLM: padded and packed batches, transforms, checkpointing, the head ----------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("trainable", [("connector", "llm"), ("connector",), ("llm",)])
def test_llm_flops_on_a_padded_batch(family, trainable):
    """GQA (tiny: 4 query heads, 2 key/value heads), biases (Qwen2), fused qkv / gate_up (Phi-3); trained, frozen under
    a trained connector (2×: gradients pass through), trained under a frozen connector."""
    model = build(CLIP, "mlp2x_gelu", tiny_llm_spec(family), trainable=trainable)
    batch = padded(model)
    assert batch.row_lengths is not None and sum(batch.row_lengths) < batch.input_ids.numel()  # it is padded
    count = check_step(model, batch)
    llm = count.parts["llm"]
    b, t = batch.input_ids.shape
    cfg = model.llm.model.config
    attention = cfg.num_hidden_layers * 4 * b * t * t * cfg.hidden_size
    assert StepFlops(model).rates["llm"]["pair"].forward * b * t * t == attention
    # a trained LLM: an input and a weight gradient per product (2× forward); a frozen one: the input gradients (1×)
    # plus the attention products' second operand (QKᵀ and PV have no weights: both sides take a gradient)
    assert llm.backward == (2 * llm.forward if "llm" in trainable else llm.forward + attention)


def packable(model: MLLM) -> tuple[list[Sample], list[list[Sample]]]:
    """Four samples in two exactly filled rows (no padding tail), so the rows hold the same work as the samples alone."""
    s = samples(model, texts=((3, 4), (2, 9), (5, 8), (2, 3)))
    assert len(s[0].input_ids) + len(s[1].input_ids) == len(s[2].input_ids) + len(s[3].input_ids)
    return s, [[s[0], s[1]], [s[2], s[3]]]


@pytest.mark.parametrize("kind", ["plain", "trainable_encoder"])
def test_packed_rows_count_each_sample_by_itself(kind):
    trainable = ("encoder", "connector", "llm") if kind == "trainable_encoder" else ("connector", "llm")
    model = build(CLIP, "mlp2x_gelu", trainable=trainable)
    alone, rows = packable(model)
    packed = PackCollator(model.tokenizer.pad_token_id)(rows)
    assert packed.seq_lens is not None and packed.row_lengths == [sum(n) for n in packed.seq_lens]
    counter = StepFlops(model)
    one_by_one = sum(counted(lambda s=s: train_step(model, PadCollator(model.tokenizer.pad_token_id)([s]))) for s in alone)
    assert close(counter(packed).hardware_flops, one_by_one)
    # the counter on the packed batch itself: CPU SDPA computes every score of a row (B·T² pairs)
    units = counter.units(packed)
    b, t = packed.input_ids.shape
    assert units.pairs < b * t * t
    dense = counter.count(dataclasses.replace(units, pairs=b * t * t))
    assert close(dense.hardware_flops, counted(lambda: train_step(model, packed)))


def test_the_useful_flops_of_a_padded_batch_are_its_samples_run_alone():
    model = build(CLIP, "mlp2x_gelu")
    alone = samples(model)
    batch = PadCollator(model.tokenizer.pad_token_id)(alone)
    counter = StepFlops(model)
    one_by_one = sum(counted(lambda s=s: train_step(model, PadCollator(model.tokenizer.pad_token_id)([s]))) for s in alone)
    assert close(counter(batch, useful=True).hardware_flops, one_by_one)
    assert counter(batch).hardware_flops > counter(batch, useful=True).hardware_flops


def test_packed_rows_with_a_padding_tail_count_it_as_its_own_sequence():
    model = build(CLIP, "mlp2x_gelu")
    s = samples(model, texts=((3, 4), (2, 9), (5, 3)))
    packed = PackCollator(model.tokenizer.pad_token_id, max_length=96, pad_to_max=True)([[s[0], s[1]], [s[2]]])
    units = StepFlops(model).units(packed)
    lengths = packed.seq_lens
    assert units.pairs == sum(sum(n * n for n in row) + (96 - sum(row)) ** 2 for row in lengths)
    assert units.real_tokens == sum(map(sum, lengths)) and units.tokens == 2 * 96
    useful = StepFlops(model).units(packed, useful=True)
    assert useful.pairs == sum(n * n for row in lengths for n in row) and useful.tokens == units.real_tokens


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["moe", "moe_only", "lora", "lora_only", "lora_moe_token", "lora_moe_instance"])
def test_llm_transforms(kind, checkpointing):
    """Upcycled MoE FFNs (trained with the LLM, or alone: MoE-LLaVA's third stage), LoRA on q/v/down (with the
    connector, or alone), LoRA-MoE with a token router or the instance gate; with and without checkpointing (a
    wrapped last projection changes where the replay stops)."""
    model = build(CLIP, "mlp2x_gelu", tiny_llm_spec("llama", num_layers=3))
    if kind.startswith("moe"):  # top-2 of 2 with room for every token: each expert sees every token, as counted
        TRANSFORMS.build({"name": "upcycle_moe", "layers": "every_other", "num_experts": 2, "top_k": 2,
                          "capacity_factor": 64.0, "noisy_gate": False})(model)
        set_trainable(model, ["re:experts", "re:router"] if kind == "moe_only" else ["connector", "llm"])
    elif kind.startswith("lora_moe"):
        gate = kind.rpartition("_")[2]
        TRANSFORMS.build({"name": "add_lora_moe", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "num_experts": 3,
                          "top_k": 2, "dropout": 0.0, "gate": gate})(model)
        set_trainable(model, ["re:lora_", "re:gate", "re:router"])
    else:
        TRANSFORMS.build({"name": "add_lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "dropout": 0.0})(model)
        set_trainable(model, ["re:lora_"] if kind == "lora_only" else ["re:lora_", "connector"])
    if checkpointing:
        model.enable_activation_checkpointing()
    batch = padded(model)
    count = check_step(model, batch)
    assert (count.recompute > 0) == checkpointing
    frozen_connector = kind.endswith("only") or kind.startswith("lora_moe")
    assert (count.parts["connector"].backward == 0) == frozen_connector
    llm = count.parts["llm"]
    if frozen_connector:  # nothing before layer 0 trains: its frozen projections compute no input gradient
        assert llm.backward < 2 * llm.forward


@pytest.mark.parametrize("trainable", [("connector", "llm"), ("connector",), ("encoder", "connector", "llm")])
def test_activation_checkpointing_recomputes_what_the_backward_goes_through(trainable):
    model = build(CLIP, "mlp2x_gelu", trainable=trainable)
    batch = padded(model)
    plain = step_flops(model, batch)
    model.enable_activation_checkpointing()
    count = check_step(model, batch)
    assert count.model_flops == plain.model_flops and plain.recompute == 0
    # every layer is on the backward path and replays its forward but for down_proj (feeding only the residual sum)
    cfg = model.llm.model.config
    down = cfg.num_hidden_layers * batch.input_ids.numel() * 2 * cfg.intermediate_size * cfg.hidden_size
    assert count.parts["llm"].recompute == count.parts["llm"].forward - down
    assert (count.parts["encoder"].recompute > 0) == ("encoder" in trainable)
    assert count.hardware_flops == count.model_flops + count.recompute


def test_the_head_runs_at_the_supervised_rows_and_its_chunks_are_recomputed():
    model = build(CLIP, "mlp2x_gelu")
    batch = padded(model)
    rows = batch.num_loss_tokens
    vocab, width = model.llm.vocab_size, model.llm.hidden_size
    head = step_flops(model, batch).parts["head"]
    assert head.forward == 2 * rows * width * vocab and head.backward == 2 * head.forward and head.recompute == 0
    everywhere = step_flops(model, batch, head_rows=batch.input_ids.numel()).parts["head"]
    assert everywhere.forward == 2 * batch.input_ids.numel() * width * vocab

    def chunked():
        out = model(batch)
        loss, _ = head_cross_entropy(out.hidden, batch.labels, out.head, batch.num_loss_tokens, chunk_size=2)
        loss.backward()
        model.zero_grad(set_to_none=True)

    count = StepFlops(model, head_chunk=2)(batch)
    assert count.parts["head"].recompute == count.parts["head"].forward
    assert close(count.hardware_flops, counted(chunked))


def test_a_text_only_training_batch_counts_the_blank_image():
    model = build(CLIP, "mlp2x_gelu")
    texts = samples(model, images=0)
    batch = PadCollator(model.tokenizer.pad_token_id)(texts)
    assert batch.pixel_values is None
    count = check_step(model, batch)
    assert count.parts["encoder"].forward > 0
    assert StepFlops(model.eval(), trainable=False)(batch).parts["encoder"].forward == 0


def test_a_frozen_forward_has_no_backward_and_without_vision_keeps_the_llm():
    model = build(CLIP, "mlp2x_gelu")
    batch = padded(model)
    frozen = step_flops(model, batch, trainable=False)
    assert frozen.backward == 0 and frozen.recompute == 0
    with torch.no_grad():
        assert close(frozen.hardware_flops, counted(lambda: LMObjective()(model(batch), batch, None)))
    count = step_flops(model, batch)
    assert set(count.without_vision.parts) == {"llm", "head"}
    assert count.without_vision.model_flops < count.model_flops
    both = count + count
    assert both.model_flops == 2 * count.model_flops == (count * 2).model_flops
    assert PartFlops(1, 2, 3).model == 3 and PartFlops(1, 2, 3).hardware == 6


class Unregistered(Connector):
    def __init__(self, in_dims, out_dim):
        super().__init__(in_dims, out_dim)
        self.proj = torch.nn.Linear(in_dims[0], out_dim)

    def forward(self, features, text_context=None):
        return ConnectorOutput(tokens=self.proj(features[0].selected))


def test_a_connector_without_a_formula_is_refused_or_approximated():
    base = build(CLIP, "mlp2x_gelu")
    model = MLLM(base.encoder, Unregistered(base.connector.in_dims, base.connector.out_dim), base.llm).train()
    with pytest.raises(FlopsUnavailable, match="register_connector_flops"):
        StepFlops(model)
    loose = StepFlops(model, strict=False)
    assert loose.approximate == ["connector Unregistered"]
    batch = padded(model)
    tokens = batch.num_images * model.tokens_per_image()
    assert loose(batch).parts["connector"].forward == 2 * sum(p.numel() for p in model.connector.parameters()) * tokens

    @register_connector_flops(Unregistered)
    def unregistered_flops(conn, x, t, ctx):
        return Visual(linear(t, conn.proj, x[0].tokens, "image", x[0].grad()), [x[0].selected])

    check_step(model, batch)


# -- matryoshka's passes and keep_image_prefix ---------------------------------------------------------------------
def test_shortened_image_spans_keep_the_row_lengths():
    from mllm_kit.batch import keep_image_prefix

    model = build(CLIP, {"preset": "matryoshka", "scales": None})
    batch = padded(model)
    short = keep_image_prefix(batch, model.image_token_id, model.tokens_per_image(), 4, model.tokenizer.pad_token_id)
    assert short.row_lengths == [int(m.sum()) for m in short.attention_mask]


# -- peak FLOP/s -----------------------------------------------------------------------------------------------------
def test_peak_table_by_device_name_and_precision():
    from mllm_kit.training.perf import gpu_peak, math_mode, peak_flops

    expected = {
        "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.4), "NVIDIA H100 PCIe": ("H100 PCIe", 756.5),
        "NVIDIA H100 NVL": ("H100 NVL", 835.5), "NVIDIA H200": ("H200 SXM", 989.4), "NVIDIA H200 NVL": ("H200 NVL", 835.5),
        "NVIDIA A100-SXM4-80GB": ("A100", 312.0), "NVIDIA A100 80GB PCIe": ("A100", 312.0), "NVIDIA A800-SXM4-80GB": ("A800", 312.0),
        "NVIDIA H800": ("H800 SXM", 989.4), "NVIDIA H800 PCIe": ("H800 PCIe", 756.5), "NVIDIA L40S": ("L40S", 362.05),
        "NVIDIA GeForce RTX 4090": ("RTX 4090", 165.2), "NVIDIA A10G": ("A10G", 70.0),
        "Tesla V100-SXM2-32GB": ("V100 SXM2", None), "Tesla V100-PCIE-16GB": ("V100 PCIe", None),
    }
    for device, (name, bf16) in expected.items():
        entry, peak = gpu_peak(device)
        assert (entry, peak.bf16) == (name, bf16), device
        assert peak.fp16 and peak.fp32 and (peak.tf32 is None) == (bf16 is None)
    assert gpu_peak("Some Future GPU") is None
    assert math_mode("bf16-mixed") == "bf16" and math_mode("16-mixed") == "fp16" and math_mode("bf16-true") == "bf16"
    assert math_mode("32-true") in ("fp32", "tf32")
    assert peak_flops("cpu", "32-true", peak_tflops=12.5).flops == 12.5e12


def test_cpu_peak_is_measured_once_per_process():
    from mllm_kit.training.perf import cpu_peak_flops, peak_flops

    first = cpu_peak_flops(size=128, seconds=0.01)
    assert first > 1e8 and cpu_peak_flops(size=128, seconds=0.01) == first
    assert peak_flops("cpu").flops == cpu_peak_flops()


# -- the perf callback ---------------------------------------------------------------------------------------------
class _Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


class _Trainer:
    def __init__(self):
        self.global_step, self.world_size, self.precision, self.log_every_n_steps = 0, 2, "32-true", 1
        self.is_global_zero, self.loggers = True, [_Logger()]


class _Module:
    def __init__(self, model):
        self.model, self.objective, self.teacher, self.device = model, LMObjective(), None, torch.device("cpu")


def test_perf_monitor_logs_per_optimiser_step_from_host_counts():
    from mllm_kit.training.data import StepBatch
    from mllm_kit.training.perf import PerfMonitor

    model = build(CLIP, "mlp2x_gelu")
    model.enable_activation_checkpointing()
    batch = padded(model)
    trainer, module = _Trainer(), _Module(model)
    monitor = PerfMonitor(peak_tflops=1.0)
    monitor.on_train_start(trainer, module)
    for step in range(2):
        for micro in range(2):  # two micro-batches per optimiser step
            monitor.on_train_batch_start(trainer, module, StepBatch(batch, 1), 2 * step + micro)
            if micro == 1:
                trainer.global_step += 1
            monitor.on_train_batch_end(trainer, module, None, StepBatch(batch, 1), 2 * step + micro)
    logged = trainer.loggers[0].logged
    assert [s for s, _ in logged] == [1, 2]
    metrics = logged[-1][1]
    count = step_flops(model, batch)
    seconds = metrics["perf/step_s"]
    assert metrics["perf/tflops"] == pytest.approx(2 * count.model_flops / seconds / 1e12)
    assert metrics["perf/mfu"] == pytest.approx(2 * count.model_flops / seconds / 1e12)
    assert metrics["perf/hfu"] == pytest.approx(2 * count.hardware_flops / seconds / 1e12)
    assert metrics["perf/mfu_llm_only"] < metrics["perf/mfu"]
    assert metrics["perf/tokens_per_s"] == pytest.approx(2 * 2 * sum(batch.row_lengths) / seconds)
    assert metrics["perf/samples_per_s"] == pytest.approx(2 * 2 * len(batch) / seconds)
    assert metrics["perf/padding_waste"] == pytest.approx(1 - sum(batch.row_lengths) / batch.input_ids.numel())


def test_perf_monitor_in_a_lightning_run(tiny_recipe, tmp_path):
    """Every stage's trainer has the callback; the metrics land in the stage's CSV log, once per step."""
    import csv

    from mllm_kit.config.load import recipe_from_dict
    from mllm_kit.training.perf import PerfMonitor
    from mllm_kit.training.runner import RunState, prepare_stage

    recipe = recipe_from_dict(tiny_recipe(max_steps=2))
    run = tmp_path / "run"
    prepared = prepare_stage(recipe, 0, run, RunState.load(run))
    assert sum(isinstance(c, PerfMonitor) for c in prepared.trainer.callbacks) == 1
    prepared.model.train()
    prepared.trainer.fit(prepared.module, datamodule=prepared.data)
    with open(run / prepared.stage.name / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    assert len(mfu) == 2 and all(0 < v < 1 for v in mfu)
    assert all(0 <= float(r["perf/padding_waste"]) < 1 for r in rows if r.get("perf/padding_waste"))


def test_a_multi_pass_objective_and_a_teacher_are_counted_pass_by_pass():
    """Matryoshka runs the model once per token scale, each pass on a shortened batch; a distillation teacher adds its
    forward (no backward) as ``teacher.*`` parts."""
    from types import SimpleNamespace

    from mllm_kit.objectives.matryoshka import MatryoshkaObjective
    from mllm_kit.training.module import score
    from mllm_kit.training.perf import PerfMonitor

    model = build(CLIP, {"preset": "matryoshka", "scales": None})
    batch = padded(model)
    objective = MatryoshkaObjective()

    def step():
        parts, _, _ = score(model, objective, batch, None)
        parts["loss"].backward()
        model.zero_grad(set_to_none=True)

    counter = StepFlops(model)
    passes = objective.passes(batch, model)
    assert len(passes) == 3  # 16, 4 and 1 tokens per image
    closed = sum((counter(p.batch) for p in passes), FlopCount())
    assert close(closed.hardware_flops, counted(step))
    module = _Module(model)
    module.objective = objective
    monitor = PerfMonitor(peak_tflops=1.0)
    monitor.on_train_start(_Trainer(), module)
    assert monitor._batch_flops(module, batch).model_flops == closed.model_flops

    teacher = build(CLIP, "mlp2x_gelu").eval()
    student = build(CLIP, "mlp2x_gelu")
    module = _Module(student)
    module.teacher = SimpleNamespace(model=teacher)
    monitor = PerfMonitor(peak_tflops=1.0)
    monitor.on_train_start(_Trainer(), module)
    flops = monitor._batch_flops(module, padded(student))
    alone = step_flops(teacher, padded(student), trainable=False)
    assert {k: v for k, v in flops.parts.items() if k.startswith("teacher.")} == {f"teacher.{k}": v for k, v in alone.parts.items()}
    assert flops.model_flops == step_flops(student, padded(student)).model_flops + alone.model_flops
    assert "teacher.encoder" not in flops.without_vision.parts and "teacher.llm" in flops.without_vision.parts
