"""Generation: batched = one by one, stop strings cut exactly, streaming = generate, sampling, continuation scores."""

import pytest
import torch
from PIL import Image

from mllm_kit import MLLM, Batch
from mllm_kit.config import resolve_model
from mllm_kit.config.recipe import DataSpec
from mllm_kit.errors import ConfigError, DataError
from mllm_kit.inference.generation import GenerationConfig, Generator, Prompt, cut_at_stop, hold_back_stops
from mllm_kit.tiny import tiny_encoder_spec, tiny_llm_spec


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    model = MLLM.build(resolve_model(tiny_encoder_spec("clip"), "mlp2x_gelu", tiny_llm_spec("llama")))
    with torch.no_grad():  # a random init answers with near-uniform logits; sharpen them so greedy paths differ
        model.llm.model.get_output_embeddings().weight.mul_(20)
    return Generator(model, DataSpec(template="chatml", max_length=512))


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40 + seed, 32 + 2 * seed, 3, generator=g) * 255).byte().numpy())


PROMPTS = [
    Prompt("What colour is it?", images=[_image(0)]),
    Prompt("Describe both pictures in a long and careful sentence, please.", images=[_image(1), _image(2)]),
    Prompt("Say something without a picture."),
    Prompt("Compare <image> with this one.", images=[_image(3)]),
]


def test_batched_generation_equals_one_by_one(generator):
    config = GenerationConfig(max_new_tokens=6)
    batched = generator.generate(PROMPTS, config, batch_size=4)
    single = [generator.generate([p], config)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # the prompts (and their images) lead to different answers


def test_image_changes_the_answer(generator):
    config = GenerationConfig(max_new_tokens=6)
    a = generator.generate([Prompt("What is this?", images=[_image(4)])], config)
    b = generator.generate([Prompt("What is this?", images=[_image(7)])], config)
    assert a != b


def test_stop_strings_cut_exactly(generator):
    full = generator.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=10))[0]
    assert len(full) > 3
    stop = full[2:4]
    cut = generator.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=10, stop=(stop,)))[0]
    assert cut == full[: full.find(stop)]


def test_stream_joins_to_the_generated_answer(generator):
    for config in (GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=8, stop=("e",))):
        pieces = list(generator.stream(PROMPTS[1], config))
        assert "".join(pieces) == generator.generate([PROMPTS[1]], config)[0]


def test_hold_back_stops_never_yields_a_stop():
    pieces = ["Hel", "lo <", "|en", "d|> more"]
    assert list(hold_back_stops(iter(pieces), ["<|end|>"])) == ["Hel", "lo "]
    assert "".join(hold_back_stops(iter(["a<", "b"]), ["<|end|>"])) == "a<b"
    assert cut_at_stop("one. two\nthree", ["\n", "."]) == "one"


def test_sampling_is_seeded_and_differs_from_greedy(generator):
    sample = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    state = torch.random.get_rng_state()
    a, b = (generator.generate(PROMPTS[:2], sample) for _ in range(2))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert a == b
    others = {tuple(generator.generate(PROMPTS[:2], GenerationConfig(**{**sample.__dict__, "seed": s}))) for s in range(4)}
    assert len(others) > 1


def test_loglikelihood_matches_a_manual_forward(generator):
    prompts, options = [PROMPTS[0], PROMPTS[0], PROMPTS[2]], ["red", "a blue square", "yes"]
    scores = generator.loglikelihood(prompts, options)
    for prompt, option, (score, greedy) in zip(prompts, options, scores):
        sample = generator.samples([prompt])[0]
        reply = generator.model.tokenizer(option, add_special_tokens=False).input_ids
        full = generator.samples([prompt], [option])[0]
        assert full.input_ids[: len(sample.input_ids)].tolist() == sample.input_ids.tolist()
        assert full.input_ids[len(sample.input_ids) : len(sample.input_ids) + len(reply)].tolist() == reply
        ids = full.input_ids[None, : len(sample.input_ids) + len(reply)]
        with torch.no_grad():
            embeds, _ = generator.model.embed_inputs(Batch(input_ids=ids, pixel_values=full.pixel_values))
            logits = generator.model.llm(inputs_embeds=embeds).logits[0].float()
        logp = torch.log_softmax(logits[len(sample.input_ids) - 1 : -1], -1)
        expected = logp.gather(1, torch.tensor(reply)[:, None]).sum()
        assert score == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(reply)).all())


def test_greedy_continuation_is_marked_greedy(generator):
    tok = generator.model.tokenizer
    token = tok("x", add_special_tokens=False).input_ids
    assert len(token) == 1
    head = generator.model.llm.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, out: out.index_add(-1, torch.tensor(token), torch.full((*out.shape[:-1], 1), 1e3)))
    try:  # the head now prefers "x" everywhere: "x" is the greedy reply, "y" is not
        (x_score, x_greedy), (y_score, y_greedy) = generator.loglikelihood(PROMPTS[:2], ["x", "y"])
        assert generator.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=2))[0] == "xx"
    finally:
        hook.remove()
    assert x_greedy and x_score == pytest.approx(0.0, abs=1e-3)
    assert not y_greedy and y_score < -100


def test_bad_input_is_a_clear_error(generator, tmp_path):
    with pytest.raises(ConfigError, match="temperature"):
        GenerationConfig(temperature=0)
    with pytest.raises(DataError, match="placeholder"):
        generator.generate([Prompt("<image> and <image>", images=[_image(0)])])
    with pytest.raises(DataError, match="not found"):
        generator.generate([Prompt("look", images=[tmp_path / "missing.png"])])
    with pytest.raises(DataError, match="max_length"):
        generator.generate([Prompt("word " * 600)])


# -- the commands: predict (resumable) and chat, on a finished tiny run --------------------------------------------
def _questions(tmp_path, n: int = 5):
    import json

    from mllm_kit.data.synthetic import SynthConfig, generate

    paths = generate(tmp_path / "synth", SynthConfig(num_align=2, num_sft=2, num_eval=n, image_size=64))
    records = json.loads(paths.eval.read_text())
    lines = [json.dumps({"question_id": f"q{k}", "image": str(paths.image_root / r["image"]),
                         "text": r["conversations"][0]["value"].replace("<image>", "").strip()}) for k, r in enumerate(records)]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_predict_resumes_after_a_kill_with_each_id_once(tiny_run, tmp_path):
    import json

    from mllm_kit.cli.main import main

    data, out = _questions(tmp_path), tmp_path / "out" / "pred.jsonl"
    args = ["predict", "--run", str(tiny_run), "--data", str(data), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4"]
    assert main(args) == 0
    full = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in full] == [f"q{k}" for k in range(5)]
    # A kill mid-write leaves two whole lines and half of the third: the resumed run redoes the rest, once each.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    assert main(args) == 0
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in resumed) == [f"q{k}" for k in range(5)]
    assert {r["id"]: r["text"] for r in resumed} == {r["id"]: r["text"] for r in full}
    assert main(args) == 0 and out.read_text().count("\n") == 5  # nothing left to do


def test_predict_bad_input_is_a_clear_error(tiny_run, tmp_path, capsys):
    from mllm_kit.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "image": "nope.png", "text": "hi"}\n{"image": "x.png"}\n')
    assert main(["predict", "--run", str(tiny_run), "--data", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl" in (err := capsys.readouterr().err) and "'question_id' and 'text'" in err
    bad.write_text('{"question_id": 1, "image": "nope.png", "text": "hi"}\n')
    assert main(["predict", "--run", str(tiny_run), "--data", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_chat_streams_and_keeps_the_conversation(tiny_run, tmp_path, monkeypatch, capsys):
    from mllm_kit.cli.main import main
    from mllm_kit.inference import Generator

    image = tmp_path / "img.png"
    _image(0).save(image)
    seen = []
    original = Generator.stream

    def spy(self, prompt, config):
        seen.append(prompt)
        return original(self, prompt, config)

    monkeypatch.setattr(Generator, "stream", spy)
    lines = iter([f"/image {image}", "what is it?", "and now?", "/reset", "hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["chat", "--run", str(tiny_run), "--max-new-tokens", "3"]) == 0
    assert [len(p.images) for p in seen] == [1, 1, 0]
    assert [len(p.history) for p in seen] == [0, 2, 0]
    assert seen[0].text.startswith("<image>\n") and "model>" in capsys.readouterr().out
