"""The prompts' KV cache in the unmasking rounds: `image_token_prefix_cache` reads the columns before the images'
slots once, `image_token_conditions(..., prefix_cache=...)` runs the LLM on the columns after them only, and the
drawing pipelines (text-to-image, editing; guided or not) give the same tokens with and without it."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_processor, tiny_setokim

from transformers_setok.generation import noise_scheduler_for
from transformers_setok.modeling.modeling_setokim import SetokimPrefixCache
from transformers_setok.pipelines import SetokimImageEditingPipeline, SetokimTextToImagePipeline

# Cached against uncached on CPU float32: the same sums in another order (the LLM's matmuls on T - P rows instead of
# T, the projector on other row counts). Measured over 5 seeds and both row orders, hidden states of magnitude ~2-3:
# conditions differ by at most 4.8e-7 (Llama) and 1.9e-6 (Gemma 3); drawn tokens by at most 6e-7, pixels by 9e-8.
TOKENS_ATOL = 1.5e-6
PIXELS_ATOL = 3e-7

# Backbone -> (text config overrides, tolerance of the conditions).
BACKBONES = {
    "llama": ({}, 1e-6),
    # Sliding-window layers keep only their last `sliding_window - 1` columns: the prefix below is longer than that.
    "gemma3": (dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=4), 4e-6),
}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def drawing_model(processor, **text_overrides):
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True, **text_overrides)
    for parameter in model.generation_head.parameters():  # a fresh head predicts zero: give it something to say
        torch.nn.init.normal_(parameter, std=0.05)
    return model


@pytest.fixture(scope="module")
def model(processor):
    return drawing_model(processor)


@pytest.fixture(scope="module")
def sources():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


# --------------------------------------------------------------------------------------------------------------------
# The model: cached conditions


def rows_with_slots(processor, specs) -> tuple[dict, list[int]]:
    """Left-padded rows from `(words before, source token count or None, words after, slot count)` specs: `words
    before [Img] <image> x source [/Img] words after [Img] <image> x slots [/Img]` (no source block for None). Returns
    the batch and each row's source count (0 without one)."""
    tokenizer = processor.tokenizer
    image, boi, eoi = processor.image_token_id, processor.boi_token_id, processor.eoi_token_id
    rows = []
    for before, source, after, slots in specs:
        row = tokenizer(before)["input_ids"]
        if source is not None:
            row += [boi] + [image] * source + [eoi]
        row += tokenizer(after)["input_ids"] + [boi] + [image] * slots + [eoi]
        rows.append(row)
    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch), [source or 0 for _, source, _, _ in specs]


def slot_columns(batch, processor) -> list[torch.Tensor]:
    """Each row's slot columns: the `<image>` tokens of its last block."""
    columns = []
    for row in batch["input_ids"]:
        images = (row == processor.image_token_id).nonzero().flatten()
        columns.append(images[images > int((row == processor.boi_token_id).nonzero()[-1])])
    return columns


def rounds_of(batch, processor, source_counts, token_dim, seed=0):
    """Three unmasking rounds over `batch`'s slots, each revealing more of them in a random order: per round the
    `masked_image_tokens` and the visible tokens per image (a row's source, then its drawn slots)."""
    generator = torch.Generator().manual_seed(seed)
    sources = [torch.randn(n, token_dim, generator=generator) for n in source_counts]
    columns = slot_columns(batch, processor)
    orders = [torch.randperm(len(c), generator=generator) for c in columns]
    rounds = []
    for fraction in (0.0, 0.4, 0.8):
        hidden = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        visible = []
        for row, (cols, order) in enumerate(zip(columns, orders)):
            shown = int(fraction * len(cols))
            hidden[row, cols[order[shown:]]] = True
            if source_counts[row]:
                visible.append(sources[row])
            visible.append(torch.randn(shown, token_dim, generator=generator))
        rounds.append((hidden, visible))
    return rounds


def snapshot(cache: SetokimPrefixCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def assert_holds(cache: SetokimPrefixCache, before, prefix_length: int):
    """`cache` still holds the prefix alone, as it was when built."""
    assert cache.get_seq_length() == cache.prefix_length == prefix_length
    after = snapshot(cache)
    assert len(after) == len(before)
    for (keys, values), (old_keys, old_values) in zip(after, before):
        assert torch.equal(keys, old_keys) and torch.equal(values, old_values)


def columns_read(model) -> tuple[list[int], object]:
    """The number of columns of each LLM forward (a hook on the language model; remove it with `.remove()`)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].shape[1])

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


# Three rows of different prompt lengths and token counts; the first holds an input image (an edit's source). Left
# padded, the split (row 2's first slot, 10 columns from the end) cuts row 1's source block: 3 of its 4 tokens lie in
# the prefix, the last one after it.
MIXED_ROWS = [
    ("User :", 4, "a cat Assistant :", 2),
    ("User : what is in the image ? Assistant :", None, "", 9),
    ("User : a cat Assistant :", None, "", 5),
]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cached_conditions_equal_the_whole_pass_round_after_round(processor, backbone):
    overrides, tolerance = BACKBONES[backbone]
    model = drawing_model(processor, **overrides)
    batch, source_counts = rows_with_slots(processor, MIXED_ROWS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rounds = rounds_of(batch, processor, source_counts, model.config.vision_config.token_dim)
    split = min(int(columns[0]) for columns in slot_columns(batch, processor))
    assert (split, ids.shape[1]) == (11, 21) and ids[0, split] == processor.image_token_id  # the source is cut

    cache = model.image_token_prefix_cache(ids, mask, *rounds[0])
    assert isinstance(cache, SetokimPrefixCache) and cache.get_seq_length() == split  # default: the first slot
    assert torch.equal(cache.prefix_input_ids, ids[:, :split])
    built = snapshot(cache)
    seen, hook = columns_read(model)
    try:
        for hidden, visible in rounds:
            whole = model.image_token_conditions(ids, mask, hidden, visible)
            cached = model.image_token_conditions(ids, mask, hidden, visible, prefix_cache=cache)
            assert cached.shape == whole.shape == (int(hidden.sum()), model.config.text_config.hidden_size)
            torch.testing.assert_close(cached, whole, rtol=0, atol=tolerance)
            assert_holds(cache, built, split)
    finally:
        hook.remove()
    assert seen == [21, 21 - split] * len(rounds)  # the cached passes read the columns after the split only


def test_a_shorter_prefix_serves_too(processor, model):
    batch, source_counts = rows_with_slots(processor, MIXED_ROWS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden, visible = rounds_of(batch, processor, source_counts, model.config.vision_config.token_dim, seed=1)[1]
    cache = model.image_token_prefix_cache(ids, mask, hidden, visible, prefix_length=3)
    assert cache.get_seq_length() == 3
    torch.testing.assert_close(
        model.image_token_conditions(ids, mask, hidden, visible, prefix_cache=cache),
        model.image_token_conditions(ids, mask, hidden, visible),
        rtol=0,
        atol=BACKBONES["llama"][1],
    )


def test_an_input_image_in_the_prefix_is_projected_once(processor, model):
    # Without the 9-slot row the split falls after row 1's source block: its 4 tokens are all in the prefix.
    batch, source_counts = rows_with_slots(processor, [MIXED_ROWS[0], MIXED_ROWS[2]])
    rounds = rounds_of(batch, processor, source_counts, model.config.vision_config.token_dim)
    projected = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: projected.append(len(out)))
    try:
        cache = model.image_token_prefix_cache(batch["input_ids"], batch["attention_mask"], *rounds[0])
        for hidden, visible in rounds:
            model.image_token_conditions(
                batch["input_ids"], batch["attention_mask"], hidden, visible, prefix_cache=cache
            )
    finally:
        hook.remove()
    drawn_visible = [sum(len(tokens) for tokens in visible) - 4 for _, visible in rounds]
    assert projected == [4] + drawn_visible  # the source once, then each round's visible drawn tokens only


def test_bad_prefix_caches_are_refused(processor, model):
    batch, source_counts = rows_with_slots(processor, MIXED_ROWS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden, visible = rounds_of(batch, processor, source_counts, model.config.vision_config.token_dim)[0]
    cache = model.image_token_prefix_cache(ids, mask, hidden, visible)
    other = ids.clone()
    other[2, 10] = processor.tokenizer.convert_tokens_to_ids("what")  # row 2's "a"
    with pytest.raises(ValueError, match="`prefix_cache` holds .* not the first columns"):
        model.image_token_conditions(other, mask, hidden, visible, prefix_cache=cache)
    with pytest.raises(ValueError, match="`prefix_cache` holds .* not the first columns"):
        model.image_token_conditions(ids[:2], mask[:2], hidden[:2], visible[:3], prefix_cache=cache)
    earlier = hidden.clone()
    earlier[0, 8] = True  # a source token of row 0, in the prefix
    with pytest.raises(ValueError, match="hidden slots in the 11 columns of `prefix_cache`"):
        model.image_token_conditions(ids, mask, earlier, visible, prefix_cache=cache)
    with pytest.raises(ValueError, match=r"`prefix_length` \(12\) reaches past column 11"):
        model.image_token_prefix_cache(ids, mask, hidden, visible, prefix_length=12)
    with pytest.raises(ValueError, match="must be what `image_token_prefix_cache` returned"):
        model.image_token_conditions(ids, mask, hidden, visible, prefix_cache=object())
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.image_token_conditions(ids, mask, hidden, visible[1:], prefix_cache=cache)


# --------------------------------------------------------------------------------------------------------------------
# The pipelines: with and without the cache


def text_to_image(model, processor, reuse, **kwargs):
    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.reuse_prefix_cache = reuse
    prompts = ["a cat", "what is in the image ?"]
    options = dict(num_inference_steps=5, num_unmasking_rounds=3, max_image_tokens=9, output_type="pt")
    return pipe(prompts, generator=torch.Generator().manual_seed(12), **options, **kwargs)


def editing(model, processor, reuse, sources, **kwargs):
    pipe = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.reuse_prefix_cache = reuse
    options = dict(num_inference_steps=3, num_unmasking_rounds=3, max_image_tokens=6, output_type="pt")
    return pipe(image=sources, prompt="a cat", generator=torch.Generator().manual_seed(3), **options, **kwargs)


def assert_same_draw(cached, whole):
    assert [len(t) for t in cached.image_tokens] == [len(t) for t in whole.image_tokens]
    for a, b in zip(cached.image_tokens, whole.image_tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=TOKENS_ATOL)
    torch.testing.assert_close(cached.images, whole.images, rtol=0, atol=PIXELS_ATOL)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_text_to_image_draws_the_same_with_and_without_the_cache(model, processor, guidance_scale):
    cached = text_to_image(model, processor, True, guidance_scale=guidance_scale)
    whole = text_to_image(model, processor, False, guidance_scale=guidance_scale)
    assert [len(t) for t in cached.image_tokens] == [4, 5]  # rows of different token counts
    assert_same_draw(cached, whole)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (2.5, 1.0), (2.5, 1.5)])
def test_editing_draws_the_same_with_and_without_the_cache(model, processor, sources, scales):
    text_scale, image_scale = scales
    options = dict(guidance_scale=text_scale, image_guidance_scale=image_scale)
    cached = editing(model, processor, True, sources, **options)
    whole = editing(model, processor, False, sources, **options)
    assert_same_draw(cached, whole)


def spy_on_rounds(model, monkeypatch) -> dict:
    """Records each cache `image_token_prefix_cache` builds and, for every `image_token_conditions` call, the cache it
    got, the rows, and whether that cache held its prefix alone (unchanged) before and after the call."""
    records = {"built": [], "calls": []}
    build, conditions = model.image_token_prefix_cache, model.image_token_conditions

    def spy_build(*args, **kwargs):
        cache = build(*args, **kwargs)
        records["built"].append((cache, snapshot(cache), cache.get_seq_length()))
        return cache

    def unchanged(cache) -> bool:
        _, first, length = records["built"][-1]
        try:
            assert_holds(cache, first, length)
        except AssertionError:
            return False
        return True

    def spy_conditions(input_ids, attention_mask, hidden, visible, prefix_cache=None):
        before = unchanged(prefix_cache)
        out = conditions(input_ids, attention_mask, hidden, visible, prefix_cache=prefix_cache)
        records["calls"].append((prefix_cache, input_ids.shape, before, unchanged(prefix_cache)))
        return out

    monkeypatch.setattr(model, "image_token_prefix_cache", spy_build)
    monkeypatch.setattr(model, "image_token_conditions", spy_conditions)
    return records


@pytest.mark.parametrize("task", ["text-to-image", "editing"])
def test_one_cache_serves_every_round_and_is_left_as_built(model, processor, sources, monkeypatch, task):
    records = spy_on_rounds(model, monkeypatch)
    if task == "text-to-image":
        text_to_image(model, processor, True, guidance_scale=3.0)
        variants = 2
    else:
        editing(model, processor, True, sources, guidance_scale=2.5, image_guidance_scale=1.5)
        variants = 3
    [(cache, _, length)] = records["built"]
    calls = records["calls"]
    assert len(calls) == 3 and all(call[0] is cache for call in calls)
    assert all(shape == (variants * 2, shape[1]) for _, shape, _, _ in calls)  # every variant's rows, in one cache
    assert cache.prefix_input_ids.shape == (variants * 2, length) and length < calls[0][1][1]
    assert all(before and after for _, _, before, after in calls)
