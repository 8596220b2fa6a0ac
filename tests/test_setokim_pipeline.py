"""pipeline("image-text-to-text") on a saved Setokim: transformers' own pipeline, with chat messages, text with
images, batches; with the package installed and, for an exported folder, with `trust_remote_code` without it."""

import pytest
import torch
from conftest import tiny_processor, tiny_setokim
from PIL import Image
from transformers import pipeline
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

from transformers_setok import SetokimForConditionalGeneration


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


def expected_answer(pipe, prompt, images):
    """A chat answer as transformers' pipeline writes it: the decoded prompt cut off the decoded whole (so the word-level
    tokenizer's space between the two stays at the front of a non-empty answer)."""
    inputs = pipe.model.prepare_inputs(pipe.processor, [prompt], images)
    whole = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)

    def decode(ids):
        return pipe.processor.post_process_image_text_to_text(ids, skip_special_tokens=True)[0]

    decoded_prompt = decode(inputs["input_ids"])
    assert decode(whole).startswith(decoded_prompt)
    return decode(whole)[len(decoded_prompt) :]


def test_plain_pipeline_call_uses_transformers_own_pipeline(saved):
    pipe = pipeline("image-text-to-text", model=str(saved))
    assert type(pipe) is ImageTextToTextPipeline
    assert isinstance(pipe.model, SetokimForConditionalGeneration)


def test_the_deprecated_subclass_still_imports():
    from transformers_setok.processing.pipeline_setokim import SetokimImageTextToTextPipeline

    assert issubclass(SetokimImageTextToTextPipeline, ImageTextToTextPipeline)


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
    assert result[0]["generated_text"][-1]["content"] == expected_answer(pipe, prompt, [images["coffee"]])


def test_batched_samples_with_different_image_counts(saved, images):
    pipe = pipeline("image-text-to-text", model=str(saved))
    texts = ["what is <image> ?", "<image> a <image>"]
    groups = [[images["chelsea"]], [images["coffee"], images["chelsea"]]]
    batched = pipe(images=groups, text=texts, max_new_tokens=3, do_sample=False, batch_size=2, return_tensors=True)
    for result, text, group in zip(batched, texts, groups):
        alone = expected_ids(pipe, [text], group)[0]
        assert torch.as_tensor(result["generated_token_ids"])[-3:].tolist() == alone.tolist()


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from transformers_setok.hub import export_setokim

    model, processor = AutoModelForImageTextToText.from_pretrained(saved), AutoProcessor.from_pretrained(saved)
    folder = export_setokim(model, processor, tmp_path_factory.mktemp("export") / "tiny", name="tiny", repo="me/tiny")
    assert not hasattr(type(model), "_auto_class") or type(model).__dict__.get("_auto_class") is None
    return folder


def test_exported_folder_declares_no_custom_pipeline_and_states_the_tested_range(exported):
    import json

    from transformers_setok.hub.model_card import supported_transformers

    for name in ("model.safetensors", "modeling_setokim.py", "processing_setokim.py", "compat_setokim.py"):
        assert (exported / name).is_file(), name
    assert "custom_pipelines" not in json.loads((exported / "config.json").read_text())
    assert f"transformers{supported_transformers()}" in (exported / "README.md").read_text()
    assert supported_transformers().startswith(">=5.23,<")


def test_exported_folder_runs_the_pipeline_with_the_package_installed(exported, saved, images):
    pipe = pipeline("image-text-to-text", model=str(exported))  # no trust_remote_code needed: the classes are known
    assert type(pipe.model) is SetokimForConditionalGeneration
    result = pipe(
        images=[images["chelsea"]], text="what is <image> ?", max_new_tokens=3, do_sample=False, return_tensors=True
    )
    expected = expected_ids(
        pipeline("image-text-to-text", model=str(saved)), ["what is <image> ?"], [images["chelsea"]]
    )
    assert torch.as_tensor(result[0]["generated_token_ids"])[-3:].tolist() == expected[0].tolist()


def test_exported_folder_runs_the_pipeline_without_the_package(exported, saved, tmp_path, images):
    import json
    import subprocess
    import sys

    images["chelsea"].save(tmp_path / "cat.png")
    images["coffee"].save(tmp_path / "cup.png")
    child = f"""
import importlib.abc, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "transformers_setok":
            raise ImportError(name)
sys.meta_path.insert(0, Hide())
from PIL import Image
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={str(exported)!r}, trust_remote_code=True)
cat, cup = Image.open({str(tmp_path / "cat.png")!r}), Image.open({str(tmp_path / "cup.png")!r})
single = pipe(images=[cat], text="what is <image> ?", max_new_tokens=3, do_sample=False, return_tensors=True)
batched = pipe(images=[[cat], [cup, cat]], text=["what is <image> ?", "<image> a <image>"], max_new_tokens=3,
               do_sample=False, batch_size=2, return_tensors=True)
chat = [{{"role": "user", "content": [{{"type": "image", "image": cup}}, {{"type": "text", "text": "what is in the image ?"}}]}}]
answer = pipe(text=chat, max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]["content"]
print(json.dumps({{
    "single": single[0]["generated_token_ids"][-3:].tolist(),
    "batched": [r["generated_token_ids"][-3:].tolist() for r in batched],
    "chat": answer,
    "hidden": "transformers_setok" not in sys.modules,
}}))
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
    cat, cup = Image.open(tmp_path / "cat.png"), Image.open(tmp_path / "cup.png")
    prompt = pipe.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert report == {
        "single": expected_ids(pipe, ["what is <image> ?"], [cat])[0].tolist(),
        "batched": [
            expected_ids(pipe, ["what is <image> ?"], [cat])[0].tolist(),
            expected_ids(pipe, ["<image> a <image>"], [cup, cat])[0].tolist(),
        ],
        "chat": expected_answer(pipe, prompt, [cup]),
        "hidden": True,
    }
