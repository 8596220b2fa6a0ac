"""What transformers' common model tests check of every in-tree VLM, held by Setokim on tiny configs: assisted
decoding on image prompts, the backbone's real context limit (RoPE scaling), the tensor-parallel plan of the head,
the encoder outputs returned as `image_outputs`."""

import pytest
import torch
from test_setokim_processor import tiny_processor, tiny_setokim

from transformers_setok.modeling.modeling_setokim import context_limit

GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    return tiny_setokim(processor)


@pytest.fixture(scope="module")
def inputs(processor, photos):
    return processor(images=[photos["coffee"]], text=["what is <image> ?"], return_tensors="pt")


@pytest.mark.parametrize("assistant_seed", [None, 1], ids=["itself", "another-setokim"])
def test_assisted_decoding_on_an_image_prompt_equals_greedy(model, processor, inputs, assistant_seed):
    expected = model.generate(**inputs, **GREEDY)
    if assistant_seed is None:
        assistant = model
    else:
        torch.manual_seed(assistant_seed)
        assistant = tiny_setokim(processor)
    assisted = model.generate(**inputs, assistant_model=assistant, **GREEDY)
    assert torch.equal(assisted, expected)


def test_prompt_lookup_decoding_on_an_image_prompt_equals_greedy(model, inputs):
    assert torch.equal(
        model.generate(**inputs, prompt_lookup_num_tokens=2, **GREEDY), model.generate(**inputs, **GREEDY)
    )


@pytest.mark.parametrize(
    "rope, limit",
    [
        (None, 12),
        ({"rope_type": "linear", "factor": 2.0}, 24),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 12}, 48),
        ({"rope_type": "dynamic", "factor": 2.0}, None),
    ],
)
def test_the_context_limit_follows_rope_scaling(processor, rope, limit):
    model = tiny_setokim(processor, max_position_embeddings=12)
    if rope is not None:
        model.config.text_config.rope_parameters = {**model.config.text_config.rope_parameters, **rope}
    assert context_limit(model.config.text_config) == limit
    ids = processor.tokenizer(["what is the image ?"] * 1, return_tensors="pt")["input_ids"]
    long = ids.repeat(1, 4)  # 20 tokens: past max_position_embeddings, within a factor-2 scaling
    if limit is not None and long.shape[1] > limit:
        with pytest.raises(ValueError, match=f"{limit} positions"):
            model(input_ids=long)
    else:
        assert model(input_ids=long).logits.shape[1] == long.shape[1]


def test_gemma_style_per_layer_rope_takes_the_most_limited():
    from types import SimpleNamespace

    config = SimpleNamespace(
        max_position_embeddings=32,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0},
            "sliding_attention": {"rope_type": "default"},
        },
    )
    assert context_limit(config) == 32


def test_the_lm_head_is_column_sharded_as_in_llava(model):
    from transformers import LlavaForConditionalGeneration

    assert type(model)._tp_plan == {"lm_head": "colwise_gather_output"} == LlavaForConditionalGeneration._tp_plan
    # the built model's plan is the head's and the backbone's layers (transformers merges them in post_init)
    assert model._tp_plan["lm_head"] == "colwise_gather_output"
    assert any(key.startswith("model.language_model.layers") for key in model._tp_plan)


def test_encoder_outputs_are_returned_as_image_outputs(model, processor, photos):
    inputs = model.prepare_inputs(processor, ["what is <image> ?"], [photos["coffee"]])
    features = inputs["mm_encoder_outputs"]["image"]
    out = model(**inputs)
    assert out.image_outputs is features
    with torch.no_grad():
        again = model(
            input_ids=inputs["input_ids"],
            pixel_values=processor.image_processor([photos["coffee"]], return_tensors="pt")["pixel_values"],
        )
    assert [len(f) for f in again.image_outputs.pooler_output] == [len(f) for f in features.pooler_output]


def test_static_cache_generation_equals_dynamic(model, inputs):
    static = model.generate(**inputs, cache_implementation="static", **GREEDY)
    assert torch.equal(static, model.generate(**inputs, **GREEDY))


@pytest.mark.slow
def test_a_decode_step_compiles_with_fullgraph_on_a_static_cache(model, processor, inputs):
    """`_can_compile_fullgraph` is declared: a decode step (what `generate` compiles) has no graph break."""
    assert type(model)._can_compile_fullgraph
    prefill = model.generate(
        **inputs, max_new_tokens=1, do_sample=False, cache_implementation="static", return_dict_in_generate=True
    )
    cache = getattr(prefill, "cache", None) or prefill.past_key_values
    sequence = prefill.sequences
    expanded_length = cache.get_seq_length()
    next_token = sequence[:, -1:]
    step = dict(
        input_ids=next_token,
        attention_mask=torch.ones(1, expanded_length + 1, dtype=torch.long),
        position_ids=torch.tensor([[expanded_length]]),
    )
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        logits = compiled(**step, **{"cache" if hasattr(prefill, "cache") else "past_key_values": cache}).logits
    reference = model.generate(**inputs, max_new_tokens=2, do_sample=False)[0, -1]
    assert int(logits[0, -1].argmax()) == int(reference)
