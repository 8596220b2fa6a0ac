"""What transformers' common model tests check of every in-tree VLM, held by Setokim on tiny configs: assisted
decoding on image prompts, the backbone's real context limit (RoPE scaling), the tensor-parallel plan of the head,
the encoder outputs returned as `image_outputs`."""

import pytest
import torch
from conftest import tiny_setokim

from transformers_setok.modeling.modeling_setokim import context_limit

GREEDY = dict(max_new_tokens=6, do_sample=False)


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


def test_get_image_features_returns_what_the_flags_ask_for(model, processor, photos):
    pixel_values = processor.image_processor([photos["coffee"]], return_tensors="pt")["pixel_values"]
    plain = model.get_image_features(pixel_values)
    assert plain.hidden_states is None and plain.attentions is None
    model.set_attn_implementation("eager")
    try:
        full = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    layers = model.config.vision_config.vision_config.num_hidden_layers
    assert len(full.hidden_states) == layers + 1 and len(full.attentions) == layers
    torch.testing.assert_close(full.pooler_output[0], plain.pooler_output[0])


def test_generate_keeps_the_llms_output_flags(model, inputs):
    out = model.generate(**inputs, output_hidden_states=True, return_dict_in_generate=True, max_new_tokens=2)
    assert out.hidden_states is not None and len(out.hidden_states) == 2


def test_loading_another_model_type_is_an_error(tmp_path):
    from transformers import BertConfig, BertModel

    from transformers_setok import SetokimForConditionalGeneration

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'bert'.*'setokim'"):
        SetokimForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_weights_are_initialised_as_in_a_fresh_model(model):
    from transformers_setok import SetokimForConditionalGeneration

    torch.manual_seed(0)
    fresh = SetokimForConditionalGeneration(model.config)
    torch.manual_seed(0)
    loaded = SetokimForConditionalGeneration.from_pretrained(None, config=model.config, state_dict={})
    # SigLIP's MLP and attention projections, pooled (built: std ~0.14 / ~0.18; the other init gave ~0.20 for both)
    for kind in ("mlp.fc1.weight", "self_attn.q_proj.weight"):
        pooled = [
            torch.cat([p.detach().flatten() for n, p in net.named_parameters() if "vision_model" in n and kind in n])
            for net in (fresh, loaded)
        ]
        assert float(pooled[0].std()) == pytest.approx(float(pooled[1].std()), rel=0.05), kind
