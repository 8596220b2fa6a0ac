"""SetokimProcessor: special tokens, chat template, placeholder expansion from SeTok's counts, the one-pass flow."""

import pytest
import torch
from conftest import CHAT_WORDS, tiny_config, tiny_processor, tiny_setokim, word_tokenizer
from transformers import AutoProcessor

from transformers_setok import (
    SetokImageProcessor,
    SetokimProcessor,
)


@pytest.fixture
def processor():
    return tiny_processor()


@pytest.fixture
def model(processor):
    return tiny_setokim(processor)


def test_special_tokens_are_added_once(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(CHAT_WORDS) + 3
    ids = {processor.image_token_id, processor.boi_token_id, processor.eoi_token_id}
    assert ids == {len(CHAT_WORDS), len(CHAT_WORDS) + 1, len(CHAT_WORDS) + 2}
    again = SetokimProcessor(image_processor=processor.image_processor, tokenizer=tokenizer)
    assert len(again.tokenizer) == len(CHAT_WORDS) + 3 and again.image_token_id == processor.image_token_id


def test_each_image_expands_to_its_own_count(processor, photos):
    inputs = processor(
        text=["what is <image> the <image> ?", "a cat"],
        images=[[photos["astronaut"], photos["coffee"]], []],
        image_token_counts=[3, 5],
        padding=True,
        return_tensors="pt",
    )
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    expected = ["what", "is", "[Img]"] + ["<image>"] * 3 + ["[/Img]", "the", "[Img]"] + ["<image>"] * 5
    assert tokens == expected + ["[/Img]", "?"]
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert inputs["attention_mask"][1].sum() == 2


@pytest.mark.parametrize("counts, message", [([3], "has 1 entries for 2 images"), ([3, 0], "positive integers")])
def test_counts_are_checked(processor, photos, counts, message):
    with pytest.raises(ValueError, match=message):
        processor(text="<image> <image>", images=[photos["astronaut"], photos["coffee"]], image_token_counts=counts)


def test_without_counts_each_image_keeps_one_placeholder(processor, photos):
    inputs = processor(text="what is <image> the <image> ?", images=[photos["astronaut"], photos["coffee"]])
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens == ["what", "is", "<image>", "the", "<image>", "?"]
    assert len(inputs["pixel_values"]) == 2


def test_image_block_is_the_one_spelling_of_an_image(processor):
    assert processor.image_block(2) == "[Img]<image><image>[/Img]"
    with pytest.raises(ValueError, match="positive integer"):
        processor.image_block(0)


def test_nested_images_are_checked_per_prompt(processor, photos):
    image = photos["coffee"]
    with pytest.raises(ValueError, match=r"Prompt 0 of `text` holds 2 <image> placeholders but `images\[0\]` holds 1"):
        processor(text=["<image> <image> a", "cat"], images=[[image], [image]], image_token_counts=[2, 3])
    with pytest.raises(ValueError, match="2 lists of images for 3 prompts"):
        processor(text=["<image>", "<image>", "a"], images=[[image], [image]])
    inputs = processor(text=["<image> a", "<image> cat"], images=[[image], [image]], padding=True)
    assert [row.count(processor.image_token_id) for row in inputs["input_ids"]] == [1, 1]


def test_placeholders_must_match_the_images(processor, photos):
    with pytest.raises(ValueError):
        processor(text="what <image>", images=[photos["astronaut"], photos["coffee"]], image_token_counts=[2, 2])
    with pytest.raises(ValueError):
        processor(text="what <image> <image>", images=[photos["astronaut"]], image_token_counts=[2])


def test_chat_template_has_image_blocks_and_marks_the_assistant_turn(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.rstrip("\n") == "User: <image>what is in the image ?\nAssistant: a cat</s>"
    encoded = processor.tokenizer.apply_chat_template(
        messages,
        chat_template=processor.chat_template,
        return_assistant_tokens_mask=True,
        return_dict=True,
        tokenize=True,
    )
    marked = [token for token, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert processor.tokenizer.convert_ids_to_tokens(marked) == ["a", "cat", "</s>"]


def test_prepare_inputs_runs_setok_once_and_matches_pixel_path(model, processor, photos, monkeypatch):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    calls = []
    setok_forward = model.model.vision_tower.forward
    monkeypatch.setattr(model.model.vision_tower, "forward", lambda *a, **k: calls.append(1) or setok_forward(*a, **k))
    inputs = model.prepare_inputs(processor, [prompt], [photos["chelsea"]])
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1, "SeTok runs once per image batch"
    counts = [int((inputs["input_ids"] == processor.image_token_id).sum())]
    pixel_inputs = processor(text=[prompt], images=[photos["chelsea"]], image_token_counts=counts, return_tensors="pt")
    assert torch.equal(model.generate(**pixel_inputs, max_new_tokens=4, do_sample=False), generated)


def test_saved_processor_loads_with_auto_processor(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SetokimProcessor and type(loaded.image_processor) is SetokImageProcessor
    assert loaded.image_token_id == processor.image_token_id and loaded.chat_template == processor.chat_template


def test_build_from_a_setok_and_a_causal_lm_checkpoint(processor, tmp_path, photos):
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers_setok import SetokModel
    from transformers_setok.assembly import build_setokim

    setok = SetokModel(tiny_config())
    setok.save_pretrained(tmp_path / "setok")
    SetokImageProcessor(size=32).save_pretrained(tmp_path / "setok")
    llm_config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(CHAT_WORDS)
    )
    llm = LlamaForCausalLM(llm_config)
    llm.save_pretrained(tmp_path / "llm")
    word_tokenizer().save_pretrained(tmp_path / "llm")

    model, built = build_setokim(str(tmp_path / "setok"), str(tmp_path / "llm"))
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(CHAT_WORDS) + 3 == len(built.tokenizer)
    torch.testing.assert_close(embeddings[: len(CHAT_WORDS)], llm.get_input_embeddings().weight)
    mean = llm.get_input_embeddings().weight.mean(0)
    for token_id in (built.image_token_id, built.boi_token_id, built.eoi_token_id):
        torch.testing.assert_close(embeddings[token_id], mean)
        torch.testing.assert_close(model.lm_head.weight[token_id], llm.lm_head.weight.mean(0))
    assert all(
        torch.equal(a, b) for a, b in zip(model.model.vision_tower.state_dict().values(), setok.state_dict().values())
    )
    inputs = model.prepare_inputs(built, ["what is <image> ?"], [photos["coffee"]])
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def test_bad_conversations_and_texts_are_rejected(model, processor, photos):
    with pytest.raises(ValueError, match="`conversation` is empty"):
        processor.apply_chat_template([])
    with pytest.raises(ValueError, match="`conversation` is empty"):
        processor.apply_chat_template([[]])
    with pytest.raises(ValueError):  # a placeholder without its image
        processor(text="what is <image> ?", image_token_counts=[2])
    with pytest.raises(ValueError, match="Incorrect image source"):  # strings are paths or URLs
        processor(text="<image>", images=["not an image"], image_token_counts=[2])
    with pytest.raises(TypeError, match="`images`"):
        processor(text="<image>", images=[42], image_token_counts=[2])


def test_prompt_longer_than_the_context_is_an_error(model, processor, photos):
    model.config.text_config.max_position_embeddings = 12
    with pytest.raises(ValueError, match="longer than the language model's context"):
        model.generate(**model.prepare_inputs(processor, ["what is <image> ?"], [photos["coffee"]]), max_new_tokens=2)
    short = processor(text="what is the image ?", return_tensors="pt")
    with pytest.raises(ValueError, match="12 positions"):
        model.generate(**short, max_new_tokens=10, do_sample=False)
