"""Setokim with PEFT LoRA on the LLM and with a 4-bit (bitsandbytes) LLM, on the CPU."""

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import IMAGE, counts_of, image_block, setokim_config

from transformers_setok import SetokImageProcessor, SetokimForConditionalGeneration

LLM_PROJECTIONS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@pytest.fixture
def pixels(photos):
    return SetokImageProcessor(size=32)([photos["astronaut"]], return_tensors="pt")["pixel_values"]


def test_lora_on_the_llm_only_with_the_projector_saved(pixels):
    model = SetokimForConditionalGeneration(setokim_config())
    lora = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=LLM_PROJECTIONS,
        modules_to_save=["multi_modal_projector"],
    )
    wrapped = peft.get_peft_model(model, lora)
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable)
    assert all("lora_" in name or "multi_modal_projector" in name for name in trainable), trainable
    assert not any("vision_tower" in name for name in trainable), "the SeTok tower stays untouched"

    count = counts_of(model, pixels)[0]
    ids = torch.tensor([[1] + image_block(count) + [2, 3]])
    labels = ids.masked_fill(ids == IMAGE, -100)
    wrapped(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
    assert all(p.grad is not None for name, p in wrapped.named_parameters() if p.requires_grad)
    with torch.no_grad():
        out = wrapped.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 2


def test_four_bit_llm_keeps_tower_and_projector_unquantized(pixels, tmp_path):
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernels fail on layers narrower than 64 outputs (seen with 0.50).
    config = setokim_config(hidden_size=64, intermediate_size=128, num_key_value_heads=4)
    SetokimForConditionalGeneration(config).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.float32,
        # Patterns match module names from the start: name the tower and projector by their full path.
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    )
    model = SetokimForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quantization).eval()
    linear4 = bnb.nn.Linear4bit
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, linear4)
    assert not any(isinstance(m, linear4) for m in model.model.vision_tower.modules())
    assert not any(isinstance(m, linear4) for m in model.model.multi_modal_projector.modules())
    count = counts_of(model, pixels)[0]
    ids = torch.tensor([[1] + image_block(count) + [2]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
