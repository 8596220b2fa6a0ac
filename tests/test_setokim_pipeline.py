"""pipeline("image-text-to-text") on a saved Setokim: chat messages, text with images, batches."""

import pytest
import torch
from PIL import Image
from test_setokim_processor import tiny_processor, tiny_setokim
from transformers import pipeline

from transformers_setok import SetokimForConditionalGeneration
from transformers_setok.processing.pipeline_setokim import SetokimImageTextToTextPipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_setokim(processor)
    folder = tmp_path_factory.mktemp("setokim")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(photos):
    return {name: Image.fromarray(photos[name]) for name in ("chelsea", "coffee")}


def expected_ids(pipe, text, images, **kwargs):
    inputs = pipe.model.prepare_inputs(pipe.processor, text, images, **kwargs)
    out = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_plain_pipeline_call_uses_the_setokim_pipeline(saved):
    pipe = pipeline("image-text-to-text", model=str(saved))
    assert isinstance(pipe, SetokimImageTextToTextPipeline)
    assert isinstance(pipe.model, SetokimForConditionalGeneration)


def test_text_with_images_matches_direct_generation(saved, images):
    pipe = pipeline("image-text-to-text", model=str(saved))
    result = pipe(
        images=[images["chelsea"]], text="what is <image> ?", max_new_tokens=3, do_sample=False, return_tensors=True
    )
    generated = torch.as_tensor(result[0]["generated_token_ids"])[-3:]
    assert generated.tolist() == expected_ids(pipe, ["what is <image> ?"], [images["chelsea"]])[0].tolist()


def test_chat_messages(saved, images):
    pipe = pipeline("image-text-to-text", model=str(saved))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["coffee"]},
                {"type": "text", "text": "what is in the image ?"},
            ],
        }
    ]
    result = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"][-1]["role"] == "assistant"
    prompt = pipe.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    expected = pipe.tokenizer.decode(expected_ids(pipe, [prompt], [images["coffee"]])[0], skip_special_tokens=True)
    assert result[0]["generated_text"][-1]["content"] == expected


def test_batched_samples_with_different_image_counts(saved, images):
    pipe = pipeline("image-text-to-text", model=str(saved))
    texts = ["what is <image> ?", "<image> a <image>"]
    groups = [[images["chelsea"]], [images["coffee"], images["chelsea"]]]
    batched = pipe(images=groups, text=texts, max_new_tokens=3, do_sample=False, batch_size=2, return_tensors=True)
    for result, text, group in zip(batched, texts, groups):
        alone = expected_ids(pipe, [text], group)[0]
        assert torch.as_tensor(result["generated_token_ids"])[-3:].tolist() == alone.tolist()


def test_exported_folder_runs_the_pipeline_without_the_package(saved, tmp_path, images):
    import json
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from transformers_setok.export import export_setokim

    model, processor = AutoModelForImageTextToText.from_pretrained(saved), AutoProcessor.from_pretrained(saved)
    folder = export_setokim(model, processor, tmp_path / "export", name="tiny", repo="me/tiny")
    for name in ("model.safetensors", "modeling_setokim.py", "processing_setokim.py", "pipeline_setokim.py"):
        assert (folder / name).is_file(), name
    assert "transformers>=5.23,<6" in (folder / "README.md").read_text()
    assert not hasattr(type(model), "_auto_class") or type(model).__dict__.get("_auto_class") is None
    images["chelsea"].save(tmp_path / "cat.png")
    child = f"""
import importlib.abc, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "transformers_setok":
            raise ImportError(name)
sys.meta_path.insert(0, Hide())
from PIL import Image
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
out = pipe(images=[Image.open({str(tmp_path / "cat.png")!r})], text="what is <image> ?", max_new_tokens=3,
           do_sample=False, return_tensors=True)
print(json.dumps({{"ids": out[0]["generated_token_ids"][-3:].tolist(), "hidden": "transformers_setok" not in sys.modules}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    pipe = pipeline("image-text-to-text", model=str(saved))
    expected = expected_ids(pipe, ["what is <image> ?"], [Image.open(tmp_path / "cat.png")])[0].tolist()
    assert report == {"ids": expected, "hidden": True}
