"""LoRA (peft) and LoRA-MoE (Octavius §6.2, Awaker §6.4): exact no-op at insertion, the gate's inputs and math,
the mixture's math, trainable sets, save / reload / merge, and clear errors."""

import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.data.collate import PadCollator
from mllm_kit.errors import ConfigError
from mllm_kit.llm.lora_moe import InstructionGate, LoRAMoELinear, top_k_gate
from mllm_kit.config.recipe import DataSpec
from mllm_kit.registry import TRANSFORMS
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec
from mllm_kit.training.data import build_dataset
from mllm_kit.training.trainable import apply_trainable
from mllm_kit.config import resolve_model

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"], "phi3": ["qkv_proj", "o_proj"], "phi": ["q_proj", "k_proj", "v_proj", "dense"]}


def _model(family="llama"):
    torch.manual_seed(0)
    return MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec(family))).eval()


def _batch(model):
    """Row 0: [5, image, 6, 7 | answer 8, 9]; row 1: [10, 11, image, 12 | answer 13] + pad."""
    n, img = model.tokens_per_image(), model.image_token_id
    ids = torch.tensor([[5, *[img] * n, 6, 7, 8, 9], [10, 11, *[img] * n, 12, 13, 0]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -2:] = ids[0, -2:]
    labels[1, -2] = ids[1, -2]
    g = torch.Generator().manual_seed(0)
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32, generator=g),
                 images_per_sample=[1, 1], num_image_tokens=2 * n)


def _perturb_adapters(model):
    """Training moves B away from zero; do that by hand so the adapters matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("family", sorted(ATTENTION))
@pytest.mark.parametrize("transform", ["add_lora", "add_lora_moe"])
def test_adapters_start_as_exact_no_ops(family, transform):
    model = _model(family)
    batch = _batch(model)
    with torch.no_grad():
        before = model(batch).logits
    TRANSFORMS.build({"name": transform, "target_modules": ATTENTION[family], "r": 4})(model)
    wrapped = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(wrapped) == 2 * len(ATTENTION[family])  # 2 decoder layers
    with torch.no_grad():
        assert torch.equal(model(batch).logits, before)  # B = 0


def test_lora_targets_the_encoder_and_the_llm_and_trains_only_adapters():
    model = _model()
    TRANSFORMS.build({"name": "add_lora", "target_modules": r"(encoder|llm)\..*\.(q_proj|v_proj)", "r": 4, "alpha": 8})(model)
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert {n.split(".")[0] for n in names} == {"encoder", "llm"}
    assert len(names) == 2 * (model.encoder.num_layers + len(model.llm.decoder_layers))
    layer = model.llm.decoder_layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 8 / 4 and layer.r["default"] == 4
    counts = apply_trainable(model, ["re:lora_"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and counts["connector"][0] == 0


def test_lora_saves_reloads_merges_and_exports_a_plain_model(tmp_path):
    model = _model()
    batch = _batch(model)
    TRANSFORMS.build({"name": "add_lora", "r": 4, "on": ["llm", "encoder"], "target_modules": ["q_proj", "v_proj"]})(model)
    _perturb_adapters(model)
    with torch.no_grad():
        adapted = model(batch).logits
    model.save_pretrained(tmp_path / "lora")
    reloaded = MLLM.from_pretrained(tmp_path / "lora").eval()
    assert reloaded.transforms == model.transforms
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, adapted)

    TRANSFORMS.build({"name": "merge_lora"})(reloaded)
    assert reloaded.transforms == [] and not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, adapted, atol=1e-5, rtol=1e-5)
    reloaded.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "connector.safetensors").is_file() and not (tmp_path / "merged" / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "llm")  # an ordinary HF model directory again
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight, reloaded.llm.decoder_layers[0].self_attn.q_proj.weight)
    with pytest.raises(ConfigError, match="has no LoRA adapters"):
        TRANSFORMS.build({"name": "merge_lora"})(reloaded)


def test_targets_that_match_nothing_are_a_clear_error():
    model = _model()
    with pytest.raises(ConfigError, match=r"matches no Linear layer in \['llm'\].*Did you mean 'q_proj'"):
        TRANSFORMS.build({"name": "add_lora", "target_modules": ["q_prj"]})(model)
    with pytest.raises(ConfigError, match="on=\\['vision'\\] names no model part"):
        TRANSFORMS.build({"name": "add_lora_moe", "on": ["vision"]})(model)
    with pytest.raises(ConfigError, match="1 ≤ top_k ≤ num_experts"):
        TRANSFORMS.build({"name": "add_lora_moe", "num_experts": 2, "top_k": 3})


def test_prompt_mask_is_the_prompt_before_the_first_answer():
    labels = torch.tensor([[-100, -100, 7, -100, 9], [-100, -100, -100, 4, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    got = Batch(input_ids=torch.zeros_like(labels), labels=labels, attention_mask=mask).prompt_mask()
    assert got.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    # two packed sequences in one row: the second starts at position_ids == 0 and has its own prompt
    packed = Batch(input_ids=torch.zeros(1, 7, dtype=torch.long), labels=torch.tensor([[-100, 5, 6, -100, -100, 8, -100]]),
                   position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))
    assert packed.prompt_mask().tolist() == [[True, False, False, True, True, False, False]]


def bound_gates(model, batch):
    """Run ``model`` on ``batch`` and return the ``[S, E]`` gates its LoRA-MoE layers received for that call."""
    seen = {}

    def record(module, args, kwargs, output):
        seen.setdefault("gates", kwargs["gates"])

    handle = model.llm.lora_moe_gate.layers[0].register_forward_hook(record, with_kwargs=True)
    try:
        model(batch)
    finally:
        handle.remove()
    return seen["gates"].squeeze(1)


def test_instance_gate_reads_only_instruction_tokens_and_matches_the_formula():
    model = _model()
    TRANSFORMS.build({"name": "add_lora_moe", "r": 4, "num_experts": 4, "top_k": 2})(model)
    gate = model.llm.lora_moe_gate
    assert isinstance(gate, InstructionGate) and gate.weight.shape == (64, 4)
    batch = _batch(model)
    with torch.no_grad():
        gates = bound_gates(model, batch)
        # by hand: mean of the instruction tokens' embeddings (no image, answer or pad tokens) → W_g → softmax → top-2
        emb = model.llm.embed(batch.input_ids)
        text = [emb[0, [0, 17, 18]], emb[1, [0, 1, 18]]]  # tokens 5, 6, 7 and 10, 11, 12 (16 image positions between)
        probs = torch.stack([t.mean(0) @ gate.weight for t in text]).softmax(-1)
        top, idx = probs.topk(2, dim=-1)
        expected = torch.zeros_like(probs).scatter(-1, idx, top / (top.sum(-1, keepdim=True) + 1e-9))
        torch.testing.assert_close(gates, expected)
        assert (gates > 0).sum(-1).tolist() == [2, 2]
        # answers, pixels and padding do not move the gate; an instruction token does
        changed = Batch(**{**batch.__dict__, "input_ids": batch.input_ids.clone(), "pixel_values": batch.pixel_values + 1})
        changed.input_ids[0, -1], changed.input_ids[1, -1] = 30, 31
        assert torch.equal(bound_gates(model, changed), gates)
        changed.input_ids[0, 0] = 40
        now = bound_gates(model, changed)
        assert not torch.equal(now[0], gates[0]) and torch.equal(now[1], gates[1])


def test_mixture_output_equals_the_per_expert_sum():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    gate = InstructionGate(6, 3, 2, "all", 0.2, 1.0, 0.0)
    layer = LoRAMoELinear(base, num_experts=3, r=2, alpha=4, dropout=0.0, shared_expert=True, gate=gate, top_k=2,
                          second_policy="all", second_threshold=0.2)
    assert layer.lora_A.shape == (4, 6, 2) and layer.lora_B.shape == (4, 2, 5)  # 3 routed + 1 shared
    bound = 1 / math.sqrt(6 * 2)  # kaiming_uniform(a=√5) on [E, d_in, r]: fan_in = d_in·r
    assert layer.lora_A.abs().max() <= bound and torch.count_nonzero(layer.lora_B) == 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 6)
    g = gate(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))  # [2, 3]
    expected = base(x) + sum(
        (g[:, e] if e < 3 else torch.ones(2)).view(2, 1, 1) * 2.0 * (x @ layer.lora_A[e] @ layer.lora_B[e]) for e in range(4))
    torch.testing.assert_close(layer(x, gates=g.unsqueeze(1)), expected)
    with pytest.raises(ConfigError, match="without its instance gate"):
        layer(x)


def test_top_k_gate_policies():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    both = top_k_gate(logits, 2)[0]
    torch.testing.assert_close(both[:2], probs[:2] / (probs[:2].sum() + 1e-9))
    assert both[2:].tolist() == [0.0, 0.0]
    none = top_k_gate(logits, 2, "none")[0]
    assert none[1] == 0 and none[0] == both[0]  # GShard: the first gate keeps its renormalised value
    torch.manual_seed(0)
    kept = torch.stack([top_k_gate(logits, 2, "random", 0.2, training=True)[0, 1] > 0 for _ in range(400)]).float().mean()
    assert kept == 1.0  # g₂ ≈ 0.27 > threshold 0.2: always kept
    kept = torch.stack([top_k_gate(logits, 2, "random", 0.8, training=True)[0, 1] > 0 for _ in range(2000)]).float().mean()
    assert abs(kept.item() - both[1].item() / 0.8) < 0.04  # kept with probability g₂ / threshold
    assert torch.equal(top_k_gate(logits, 2, "random", 0.8, training=False), top_k_gate(logits, 2))


def test_lora_moe_token_gate_saves_reloads_and_generates(tmp_path):
    model = _model("qwen2")
    TRANSFORMS.build({"name": "add_lora_moe", "r": 4, "gate": "token", "shared_expert": True, "target_modules": ["q_proj", "o_proj"]})(model)
    assert not hasattr(model.llm, "lora_moe_gate")
    _perturb_adapters(model)
    batch = _batch(model)
    with torch.no_grad():
        out = model(batch)
    loads = [out.metrics[f"llm_lora_moe_load_e{i}"] for i in range(4)]
    assert sum(loads).item() == pytest.approx(1.0)  # mean gates sum to 1 per token
    model.save_pretrained(tmp_path / "m")
    reloaded = MLLM.from_pretrained(tmp_path / "m").eval()
    assert all(isinstance(reloaded.get_submodule(n), LoRAMoELinear) for n, m in model.named_modules() if isinstance(m, LoRAMoELinear))
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, out.logits)
    generated = reloaded.generate(batch.input_ids[:1], batch.attention_mask[:1], batch.pixel_values[:1], max_new_tokens=3)
    assert generated.shape == (1, 3)


def test_the_data_pipeline_hands_the_gate_the_first_user_message(tmp_path):
    model = _model()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    records = [{"id": "s0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "s1", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    spec = DataSpec(train=str(tmp_path / "d.json"), template="chatml")
    assert build_dataset(model, spec, tmp_path)[0].instruction_ids is None  # models without a gate skip it
    TRANSFORMS.build({"name": "add_lora_moe", "r": 4})(model)
    assert model.reads_instruction
    data = build_dataset(model, spec, tmp_path)
    tok = model.tokenizer
    assert data[0].instruction_ids.tolist() == tok.encode("What color is it?", add_special_tokens=False)
    batch = PadCollator(tok.pad_token_id)([data[0], data[1]])
    assert batch.instruction_mask.sum(-1).tolist() == [len(data[0].instruction_ids), len(data[1].instruction_ids)]
    with torch.no_grad():
        gates = bound_gates(model, batch)
        gate = model.llm.lora_moe_gate
        emb = model.llm.embed(batch.instruction_ids[0, : len(data[0].instruction_ids)])
        probs = (emb.mean(0) @ gate.weight).softmax(-1)
        top, idx = probs.topk(2)
        torch.testing.assert_close(gates[0, idx], top / (top.sum() + 1e-9))


def test_activation_checkpointing_recomputes_lora_moe_layers_with_the_call_s_gates():
    """The gates reach a LoRA-MoE layer as an argument bound for the call; a checkpointed layer recomputed in backward gets
    them again (the checkpoint's context_fn), so gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = _model()
        TRANSFORMS.build({"name": "add_lora_moe", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0})(model)
        _perturb_adapters(model)
        model.train()
        if checkpointing:
            model.enable_activation_checkpointing()
        out = model(_batch(model))
        out.hidden.pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_moe_gate" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)
