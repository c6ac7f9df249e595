"""Visual-token dropping inside the LLM (FastV, PDrop; docs/efficiency.md): equal to the model without it when nothing
is dropped, FastV's kept set equal to eager attention's top-k, packed = each sample alone, generation equal to a manual
prefill-on-the-kept-tokens reference, a method from outside the package, FLOPs, training, and the errors."""

import textwrap

import pytest
import torch
from transformers import DynamicCache

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.config import resolve_model
from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import Sample
from mllm_kit.data.packing import PackCollator
from mllm_kit.errors import ConfigError
from mllm_kit.flops import StepFlops
from mllm_kit.flops.measure import measured_flops as counted
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec

DEPTH = 4


def build(family="llama", attn="sdpa", depth=DEPTH, connector="mlp2x_gelu") -> MLLM:
    torch.manual_seed(0)
    llm = {**tiny_llm_spec(family, num_layers=depth), "attn_implementation": attn}
    return MLLM.build(resolve_model(tiny_encoder_spec("clip"), connector, llm)).eval()


def samples(model: MLLM, layouts=((1, 6), (0, 5), (2, 7), (1, 3))) -> list[Sample]:
    """(images, text tokens) per sample; the last two tokens are the reply."""
    n, img = model.tokens_per_image(), model.image_token_id
    g = torch.Generator().manual_seed(1)
    out = []
    for k, (images, text) in enumerate(layouts):
        words = torch.randint(5, 60, (text,), generator=g).tolist()
        ids = [words[0], *([img] * n + [words[1]]) * images, *words[2:]] if images else words
        labels = [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
        out.append(Sample(input_ids=torch.tensor(ids), labels=torch.tensor(labels), num_image_tokens=n * images, id=str(k),
                          pixel_values=torch.randn(images, 3, 32, 32, generator=g) if images else None))
    return out


def kept_positions(model: MLLM, batch: Batch) -> list[torch.Tensor]:
    """Each drop's stream (original column per slot, fillers = T) in a forward over ``batch``."""
    embeds, ctx = model.embed_inputs(batch)
    steps = model.layer_steps(ctx)
    with torch.no_grad(), model.llm.stepping(ctx, steps) as call:
        model.llm.model.get_decoder()(inputs_embeds=embeds, attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
                                      use_cache=False)
    return [s.index for s in call.streams]


# -- nothing dropped: the same model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{"method": "fastv", "layer": 2, "ratio": 0.0}, {"method": "pdrop", "layers": [1, 3], "ratios": [1.0, 1.0]}],
                         ids=["fastv", "pdrop"])
def test_nothing_dropped_equals_the_model_without_a_method_padded_packed_and_generating(spec):
    model = build()
    data = samples(model)
    pad = model.tokenizer.pad_token_id
    padded, packed = PadCollator(pad)(data), PackCollator(pad)([data[:2], data[2:]])
    left = PadCollator(pad, padding_side="left")([data[0], data[3]])
    with torch.no_grad():
        reference = [model(padded).logits, model(packed).logits]
        model.set_efficiency(spec)
        real = padded.attention_mask.bool()  # what padding positions compute is read by nothing
        torch.testing.assert_close(model(padded).logits[real], reference[0][real], rtol=1e-5, atol=1e-5)
        real = torch.arange(packed.input_ids.shape[1])[None] < torch.tensor(packed.row_lengths)[:, None]
        torch.testing.assert_close(model(packed).logits[real], reference[1][real], rtol=1e-5, atol=1e-5)
        prompt = {"pixel_values": left.pixel_values, "images_per_sample": left.images_per_sample, "max_new_tokens": 6, "stop_token_ids": [-1]}
        dropped = model.generate(left.input_ids, left.attention_mask, **prompt)
        model.set_efficiency(None)
        assert torch.equal(dropped, model.generate(left.input_ids, left.attention_mask, **prompt))


# -- FastV --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_keeps_the_top_k_of_the_attention_eager_attention_returns(attn):
    """The score is computed from layer K−1's q/k projections; the reference is the attention weights an eager model
    returns at K−1: the last prompt token's row, mean over heads, at the image positions."""
    model, eager = build(attn=attn), build(attn="eager")
    data = samples(model, ((1, 6), (2, 5), (1, 9)))
    batch = PadCollator(model.tokenizer.pad_token_id, padding_side="left")(data)
    batch = Batch(**{**batch.__dict__, "labels": None})  # a prompt: its last token is the query
    layer, ratio = 2, 0.5
    with torch.no_grad():
        embeds, _ = eager.embed_inputs(batch)
        attentions = eager.llm.model.get_decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask, output_attentions=True).attentions
    weights = attentions[layer - 1][:, :, -1].mean(1)  # [B, T]: the last token's row, mean over heads
    model.set_efficiency({"method": "fastv", "layer": layer, "ratio": ratio})
    (stream,) = kept_positions(model, batch)
    n = model.tokens_per_image()
    image = batch.input_ids == model.image_token_id
    for row in range(len(data)):
        spans = image[row].nonzero().flatten().split(n)
        expected = sorted(int(i) for s in spans for i in s[weights[row, s].topk(round(n * (1 - ratio))).indices])
        kept = [int(c) for c in stream[row] if c < image.shape[1] and image[row, c]]
        assert kept == expected, (row, kept, expected)
        text = [int(c) for c in stream[row] if c < image.shape[1] and not image[row, c]]
        assert text == (~image[row] & batch.attention_mask[row].bool()).nonzero().flatten().tolist()  # every text token stays


def test_a_packed_batch_drops_per_segment_exactly_as_each_sample_alone():
    model = build()
    model.set_efficiency({"method": "fastv", "layer": 2, "ratio": 0.5})
    data = samples(model)
    pad = model.tokenizer.pad_token_id
    packed = PackCollator(pad)([data[:2], data[2:]])
    with torch.no_grad():
        logits = model(packed).logits
        start = {0: 0, 1: 0}
        for k, sample in enumerate(data):
            row = 0 if k < 2 else 1
            n = len(sample.input_ids)
            alone = model(PadCollator(pad)([sample])).logits[0]
            text = sample.input_ids != model.image_token_id
            torch.testing.assert_close(logits[row, start[row] : start[row] + n][text], alone[text], rtol=1e-5, atol=1e-5)
            start[row] += n


def test_generation_with_dropping_equals_prefill_on_the_kept_tokens_then_decode():
    """A reference written with the decoder layers directly: layers 0..K−1 on the whole prompt, the kept tokens (the
    eager top-k) at their original positions from layer K on, then greedy decode steps on the KV cache."""
    model = build()
    k_layer, ratio, steps = 2, 0.5, 5
    (sample,) = samples(model, ((1, 7),))
    batch = PadCollator(model.tokenizer.pad_token_id, padding_side="left")([sample])
    model.set_efficiency({"method": "fastv", "layer": k_layer, "ratio": ratio})
    generated = model.generate(batch.input_ids, batch.attention_mask, batch.pixel_values, max_new_tokens=steps, stop_token_ids=[-1])
    (stream,) = kept_positions(model, Batch(**{**batch.__dict__, "labels": None}))
    keep = stream[0]
    decoder, layers = model.llm.model.get_decoder(), model.llm.decoder_layers
    with torch.no_grad():
        embeds, _ = model.embed_inputs(batch)
        t = embeds.shape[1]
        cache = DynamicCache(config=model.llm.model.config)
        h, positions = embeds, torch.arange(t)[None]
        out = []
        for step in range(steps + 1):
            for i, layer in enumerate(layers):
                if step == 0 and i == k_layer:
                    h, positions = h[:, keep], positions[:, keep]
                q = h.shape[1]
                cols = cache.get_seq_length(i) + q
                mask = torch.ones(1, 1, q, cols, dtype=torch.bool).tril(cols - q)
                h = layer(h, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                          position_embeddings=decoder.rotary_emb(h, positions))
            token = model.llm.head(decoder.norm(h[:, -1])).argmax(-1)
            out.append(int(token))
            h, positions = model.llm.embed(token[None]), torch.tensor([[t + step]])
    assert generated[0].tolist() == out[:steps]


# -- PDrop --------------------------------------------------------------------------------------------------------------
def test_pdrop_keeps_a_shrinking_share_of_each_image_at_each_boundary_with_compact_positions():
    model = build(depth=6)
    model.set_efficiency({"method": "pdrop"})  # boundaries 8/16/24 of 32 → 2, 3 (rounded), 4 of 6 here; λ = 0.5
    assert [d.layer for d in model.efficiency.drops()] == [2, 3, 4] or [d.layer for d in model.efficiency.drops()] == [2, 4]
    data = samples(model, ((1, 6), (2, 5)))
    batch = PadCollator(model.tokenizer.pad_token_id)(data)
    streams = kept_positions(model, batch)
    n = model.tokens_per_image()
    image = batch.input_ids == model.image_token_id
    for j, stream in enumerate(streams):
        for row, images in enumerate([1, 2]):
            kept = [int(c) for c in stream[row] if c < image.shape[1] and image[row, c]]
            assert len(kept) == images * int(n * 0.5 ** (j + 1))
            if j:  # a later stage keeps a subset of the earlier one
                earlier = {int(c) for c in streams[j - 1][row]}
                assert set(kept) <= earlier


def test_pdrop_trains_with_and_without_activation_checkpointing_to_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build(depth=4).train()
        model.set_efficiency({"method": "pdrop", "layers": [1, 3], "ratio": 0.5})
        if checkpointing:
            model.enable_activation_checkpointing()
        batch = PadCollator(model.tokenizer.pad_token_id)(samples(model))
        out = model(batch)
        rows, cols = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        loss = torch.nn.functional.cross_entropy(out.head(out.hidden[rows, cols]), batch.labels[:, 1:][rows, cols])
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("layers.3" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)


def test_the_random_control_drops_as_many_tokens_at_the_same_layers():
    model = build()
    model.set_efficiency({"method": "random", "like": {"method": "fastv", "layer": 2, "ratio": 0.75}})
    batch = PadCollator(model.tokenizer.pad_token_id)(samples(model, ((1, 6), (2, 4))))
    image = batch.input_ids == model.image_token_id
    draws = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        (stream,) = kept_positions(model, batch)
        kept = [[int(c) for c in stream[row] if c < image.shape[1] and image[row, c]] for row in range(2)]
        assert [len(k) for k in kept] == [4, 8]  # round(16 · 0.25) per image, as FastV keeps
        draws.append(kept)
    assert draws[0] != draws[1]
    fastv = build()
    fastv.set_efficiency({"method": "fastv", "layer": 2, "ratio": 0.75})
    assert StepFlops(model.train())(batch).model_flops == StepFlops(fastv.train())(batch).model_flops


# -- a method of one's own ----------------------------------------------------------------------------------------------
TOY = '''
from dataclasses import dataclass

import torch

from mllm_kit.efficiency import TokenEfficiency
from mllm_kit.llm.steps import TokenDrop


@dataclass(frozen=True, eq=False)
class KeepFirst(TokenDrop):
    """Keeps the first ``count`` tokens of every image: the score is minus the position."""

    count: int = 1

    def score(self, hidden, call):
        rows, cols = call.image_slots()
        return -cols.float()

    def keep_counts(self, counts, original):
        return [min(self.count, n) for n in counts]


class KeepFirstTokens(TokenEfficiency):
    def __init__(self, layer: int = 1, count: int = 2):
        self.layer, self.count = layer, count

    def drops(self):
        return (KeepFirst(self.layer, count=self.count),)
'''


def test_a_drop_method_from_outside_the_package_is_one_file(tmp_path, monkeypatch):
    (tmp_path / "toy_drop.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build()
    model.set_efficiency({"_target_": "toy_drop.KeepFirstTokens", "layer": 1, "count": 3})
    batch = PadCollator(model.tokenizer.pad_token_id)(samples(model, ((1, 6), (2, 4))))
    (stream,) = kept_positions(model, batch)
    image = batch.input_ids == model.image_token_id
    for row in range(2):
        spans = image[row].nonzero().flatten().split(model.tokens_per_image())
        kept = [int(c) for c in stream[row] if c < image.shape[1] and image[row, c]]
        assert kept == [int(c) for s in spans for c in s[:3]]
    left = PadCollator(model.tokenizer.pad_token_id, padding_side="left")(samples(model, ((1, 6),)))
    assert model.generate(left.input_ids, left.attention_mask, left.pixel_values, max_new_tokens=3).shape == (1, 3)


# -- FLOPs ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{"method": "fastv", "layer": 2, "ratio": 0.5}, {"method": "pdrop", "layers": [1, 3], "ratio": 0.5}],
                         ids=["fastv", "pdrop"])
def test_flops_count_the_tokens_each_layer_runs(spec):
    """A training step's closed-form count with dropping on equals FlopCounterMode's (the scoring's few query rows are
    the only products left out), padded and packed."""
    model = build(depth=4).train()
    model.set_efficiency(spec)
    data = samples(model)
    pad = model.tokenizer.pad_token_id
    batch = PadCollator(pad)(data)

    def step():
        out = model(batch)
        rows, cols = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        out.head(out.hidden[rows, cols]).float().logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    measured = counted(step)
    closed = StepFlops(model)(batch).model_flops
    assert abs(closed - measured) <= 0.005 * measured, (closed, measured)
    model.set_efficiency(None)
    assert StepFlops(model)(batch).model_flops > closed * 1.05  # dropping saves what the count says


# -- errors ---------------------------------------------------------------------------------------------------------------
def test_bad_settings_are_named():
    model = build()
    with pytest.raises(ConfigError, match=r"model.efficiency: drops tokens from LLM layer 4.*4 decoder layers"):
        model.set_efficiency({"method": "fastv", "layer": 4})
    with pytest.raises(ConfigError, match=r"ratio .* \[0, 1\)"):
        model.set_efficiency({"method": "fastv", "ratio": 1.0})
    with pytest.raises(ConfigError, match="unknown efficiency method 'fastvv'.*Did you mean 'fastv'"):
        model.set_efficiency({"method": "fastvv"})
    deepstack = build(connector={"preset": "deepstack", "start": 1, "interval": 2, "num_crops": 2})
    with pytest.raises(ConfigError, match=r"writes into the image positions of LLM layer\(s\) \[3\].*drops image tokens from layer 2"):
        deepstack.set_efficiency({"method": "fastv", "layer": 2})
    deepstack.set_efficiency({"method": "fastv", "layer": 3, "ratio": 0.5})  # after its last injection: fine
    model.set_efficiency({"method": "fastv", "layer": 2})
    left = PadCollator(model.tokenizer.pad_token_id, padding_side="left")(samples(model, ((1, 6),)))
    with pytest.raises(ConfigError, match="beam search"):
        model.generate(left.input_ids, left.attention_mask, left.pixel_values, max_new_tokens=2, num_beams=2)
    from mllm_kit.interop.llava import llava_blockers

    assert any("model.efficiency 'fastv'" in b and "--without-efficiency" in b for b in llava_blockers(model))
