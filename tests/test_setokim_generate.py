"""Stock usage, as for every transformers VLM: `processor(images=..., text=...)` then `model.generate(**inputs)`.

The prompts hold one `<image>` per image; `generate` encodes the images once, expands the placeholders and returns
sequences that begin with the caller's `input_ids`. Also the bad inputs of that flow, and the decode steps of both
supported transformers releases (5.23 passes the cache as `past_key_values`, 5.24 as `cache`).
"""

import pytest
import torch
from conftest import count_setok_calls

GREEDY = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture
def setok_calls(model, monkeypatch):
    """The number of SeTok forwards, each with the batch size it was given."""
    return count_setok_calls(model, monkeypatch)


def new_tokens_of_the_expanded_flow(model, processor, prompts, images):
    inputs = model.prepare_inputs(processor, prompts, images, padding=True)
    return model.generate(**inputs, **GREEDY)[:, inputs["input_ids"].shape[1] :]


def test_plain_prompt_and_pixel_values(model, processor, photos, setok_calls):
    images = [photos["chelsea"]]
    inputs = processor(images=images, text=["what is <image> ?"], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 1
    out = model.generate(**inputs, **GREEDY)
    assert setok_calls == [1], "SeTok runs once per image"
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"]), "the output begins with the caller's prompt"
    setok_calls.clear()
    expected = new_tokens_of_the_expanded_flow(model, processor, ["what is <image> ?"], images)
    assert out.shape[1] == prompt_length + 4 and torch.equal(out[:, prompt_length:], expected)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_plain_prompts_with_different_image_counts(model, processor, photos, padding_side):
    processor.tokenizer.padding_side = padding_side
    try:
        prompts = ["<image> a <image> ?", "what is the image ?", "what is <image> ?"]
        groups = [[photos["coffee"], photos["chelsea"]], [], [photos["astronaut"]]]
        flat = [image for group in groups for image in group]
        inputs = processor(images=flat, text=prompts, padding=True, return_tensors="pt")
        out = model.generate(**inputs, **GREEDY)
    finally:
        processor.tokenizer.padding_side = "right"
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    for row, (prompt, group) in enumerate(zip(prompts, groups)):
        alone = new_tokens_of_the_expanded_flow(model, processor, [prompt], group or None)
        assert out[row, inputs["input_ids"].shape[1] :].tolist() == alone[0].tolist(), row


def test_return_dict_and_several_sequences_per_prompt(model, processor, photos):
    inputs = processor(images=[photos["coffee"]], text=["what <image> ?"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, return_dict_in_generate=True)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].expand(2, -1))


def test_decode_steps_may_feed_back_image_tokens(model, processor, photos):
    """A decode step whose token is `<image>` is a step of a drawn image, not a missing image: it must read the
    cache (under either release's name) instead of being taken for a first step."""
    inputs = processor(images=[photos["coffee"]], text=["what <image> ?"], return_tensors="pt")
    out = model.generate(**inputs, **GREEDY, sequence_bias={(processor.image_token_id,): 100.0})
    assert (out[0, inputs["input_ids"].shape[1] :] == processor.image_token_id).all()


def test_expanded_prompts_with_pixel_values_still_work(model, processor, photos, setok_calls):
    features = model.get_image_features(
        processor.image_processor([photos["coffee"]], return_tensors="pt")["pixel_values"]
    )
    counts = [len(f) for f in features.pooler_output]
    setok_calls.clear()
    inputs = processor(
        images=[photos["coffee"]], text=["what <image> ?"], image_token_counts=counts, return_tensors="pt"
    )
    out = model.generate(**inputs, **GREEDY)
    assert setok_calls == [1]
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_importing_the_package_leaves_transformers_pipelines_alone():
    from transformers.pipelines import PIPELINE_REGISTRY

    import transformers_setok  # noqa: F401

    impl = PIPELINE_REGISTRY.supported_tasks["image-text-to-text"]["impl"]
    name = impl if isinstance(impl, str) else f"{impl.__module__}.{impl.__qualname__}"
    assert name.startswith("transformers.pipelines."), name


# Bad input: each case names what is wrong. The ids are built by the tokenizer (the processor itself refuses such
# pairs), as a caller who edits `input_ids` after the processor would.
@pytest.mark.parametrize("num_placeholders, num_images", [(1, 2), (2, 1)])
def test_image_and_placeholder_counts_must_agree(model, processor, photos, num_placeholders, num_images):
    ids = processor.tokenizer(["what " + "<image> " * num_placeholders + "?"], return_tensors="pt")["input_ids"]
    pixel_values = processor.image_processor([photos["coffee"]] * num_images, return_tensors="pt")["pixel_values"]
    message = f"the prompts hold {num_placeholders} `<image>` placeholders but {num_images} images were given"
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, pixel_values=pixel_values, **GREEDY)


def test_placeholders_without_images_are_an_error(model, processor):
    ids = processor.tokenizer(["what <image> ?"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="hold 1 `<image>` placeholders but 0 images were given"):
        model.generate(input_ids=ids, **GREEDY)


def test_expanded_counts_must_be_setoks(model, processor, photos):
    pixel_values = processor.image_processor([photos["coffee"]], return_tensors="pt")["pixel_values"]
    count = len(model.get_image_features(pixel_values).pooler_output[0])
    wrong = processor(
        images=[photos["coffee"]], text=["what <image> ?"], image_token_counts=[count + 1], return_tensors="pt"
    )
    with pytest.raises(
        ValueError, match=f"image 0 is expanded to {count + 1} `<image>` tokens, but SeTok gives it {count}"
    ):
        model.generate(**wrong, **GREEDY)


def test_mixed_placeholder_forms_are_an_error(model, processor, photos):
    expanded = processor(images=[photos["coffee"]], text=["<image>"], image_token_counts=[2], return_tensors="pt")
    bare = processor.tokenizer(["a <image>"], return_tensors="pt")["input_ids"]
    ids = torch.cat([expanded["input_ids"], bare], dim=1)
    pixel_values = torch.cat([expanded["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="mix unexpanded `<image>` placeholders with expanded"):
        model.generate(input_ids=ids, pixel_values=pixel_values, **GREEDY)


def test_pixel_values_and_features_together_are_an_error(model, processor, photos):
    inputs = processor(images=[photos["coffee"]], text=["what <image> ?"], return_tensors="pt")
    features = model.get_image_features(inputs["pixel_values"])
    with pytest.raises(ValueError, match="either `pixel_values` or `mm_encoder_outputs"):
        model.generate(**inputs, mm_encoder_outputs={"image": features}, **GREEDY)


def test_unbalanced_image_blocks_are_an_error(model, processor):
    for text, message in [("a [/Img] ?", "closes an image block"), ("[Img] [Img] <image> [/Img]", "inside another")]:
        ids = processor.tokenizer([text], return_tensors="pt")["input_ids"]
        with pytest.raises(ValueError, match=message):
            model.generate(input_ids=ids, **GREEDY)
