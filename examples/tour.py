"""A tour of mllm-kit's parts on tiny offline models and the synthetic shapes data (runs in seconds on a CPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch.utils.data import DataLoader  # noqa: E402

from mllm_kit import MLLM  # noqa: E402
from mllm_kit.data import ConversationEncoder, LlavaDataset, PadCollator, get_template  # noqa: E402
from mllm_kit.data.synthetic import SynthConfig, generate  # noqa: E402
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec  # noqa: E402
from mllm_kit.config import resolve_model

# 1. Assemble: any registered encoder + connector preset + any HF causal LM (here tiny random ones on disk).
model = MLLM.build(resolve_model(tiny_encoder_spec("clip", image_size=64), "mlp2x_gelu", tiny_llm_spec("qwen2")))
print("visual tokens per image:", model.tokens_per_image())

# 2. Data: LLaVA JSON, a chat template, <image> expanded to N image-token ids, labels on replies only.
paths = generate("data/synthetic", SynthConfig(num_align=64, num_sft=64, num_eval=8))
encoder = ConversationEncoder(model.tokenizer, get_template("chatml"), model.image_token_id, model.tokens_per_image())
train = LlavaDataset(paths.sft, paths.image_root, encoder, model.make_image_transform(), max_length=256)
batch = next(iter(DataLoader(train, batch_size=4, collate_fn=PadCollator(model.tokenizer.pad_token_id))))
print("batch:", tuple(batch.input_ids.shape), "images:", tuple(batch.pixel_values.shape))

# 3. Forward: visual tokens are written into the LLM input embeddings at the image positions.
out = model(batch)
print("logits:", tuple(out.logits.shape))

# 4. Generate from held-out prompts (left-padded, KV cache).
prompts = LlavaDataset(paths.eval, paths.image_root, encoder, model.make_image_transform(), prompt=True)
p = PadCollator(model.tokenizer.pad_token_id, padding_side="left")([prompts[i] for i in range(2)])
new = model.eval().generate(p.input_ids, p.attention_mask, p.pixel_values, max_new_tokens=4, stop_token_ids=encoder.stop_token_ids())
print("untrained answers:", model.tokenizer.batch_decode(new, skip_special_tokens=True), "gold:", [prompts[i].target for i in range(2)])
