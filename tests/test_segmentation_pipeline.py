"""Referring segmentation at inference: the pipeline, its answer shape, remote code, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import WITHOUT_THE_PACKAGE, tiny_processor, tiny_setokim
from skimage import data

from transformers_setok.hub import export_setokim
from transformers_setok.pipelines import SetokimReferringSegmentationPipeline
from transformers_setok.pipelines.referring_segmentation import ObjectBlockLogitsProcessor


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_setokim(processor, use_mask_decoder=True)
    return SetokimReferringSegmentationPipeline(model=model, processor=processor)


@pytest.fixture(scope="module")
def photo():
    return PIL.Image.fromarray(data.coffee())


def test_the_mask_is_a_direct_forward_on_the_models_own_answer(segmenter, photo):
    model, processor = segmenter.model, segmenter.processor
    result = segmenter(photo, expression="the cup", max_text_tokens=2)
    assert result["mask"].mode == "L" and result["mask"].size == photo.size
    assert set(np.unique(np.asarray(result["mask"]))) <= {0, 255}

    # The same answer by hand: prompt, greedy block, then one forward with its slots as prompts.
    chat = [{"role": "user", "content": processor.segmentation_request("the cup")}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = model.prepare_inputs(processor, [prompt], [photo])
    length = inputs["input_ids"].shape[1]
    config = model.config
    cap = config.vision_config.max_num_clusters or config.vision_config.num_patches
    block = ObjectBlockLogitsProcessor(
        length, config.boi_token_id, config.image_token_id, config.eoi_token_id, [processor.tokenizer.eos_token_id],
        cap, 2,
    )  # fmt: skip
    sequences = model.generate(
        **inputs, do_sample=False, max_new_tokens=cap + 4, logits_processor=[block], eos_token_id=config.eoi_token_id
    )
    assert sequences[0, -1] == config.eoi_token_id
    slots = (sequences == config.image_token_id) & (torch.arange(sequences.shape[1]) >= length)
    with torch.no_grad():
        out = model(
            input_ids=sequences,
            mm_encoder_outputs=inputs["mm_encoder_outputs"],
            segmentation_prompts=slots,
            mask_image_index=torch.tensor([0]),
        )
    (expected,) = processor.image_processor.post_process_masks(out.pred_masks, [photo.size[::-1]])
    assert np.array_equal(np.asarray(result["mask"]) > 0, expected)
    assert result["score"] == pytest.approx(float(out.iou_scores[0]))


@pytest.mark.parametrize("max_text_tokens, max_object_tokens", [(0, 1), (3, 2), (5, 4)])
def test_the_answer_is_text_then_one_block_within_its_caps(segmenter, photo, max_text_tokens, max_object_tokens):
    model, processor = segmenter.model, segmenter.processor
    config = model.config
    captured = {}

    def spy(module, args, kwargs):
        if kwargs.get("segmentation_prompts") is not None:
            captured["ids"], captured["slots"] = kwargs["input_ids"], kwargs["segmentation_prompts"]

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = segmenter(
            photo, expression="the cup", max_text_tokens=max_text_tokens, max_object_tokens=max_object_tokens
        )
    finally:
        hook.remove()
    ids = captured["ids"][0].tolist()
    opened = len(ids) - 1 - ids[::-1].index(config.boi_token_id)
    assert ids[-1] == config.eoi_token_id
    slots = ids[opened + 1 : -1]
    assert 1 <= len(slots) <= max_object_tokens and set(slots) == {config.image_token_id}
    assert int(captured["slots"].sum()) == len(slots) and all(captured["slots"][0, opened + 1 : -1])
    prompt_length = (
        len(ids) - len(slots) - 2 - len(processor.tokenizer(result["text"], add_special_tokens=False)["input_ids"])
    )
    assert opened - prompt_length <= max_text_tokens


def test_lists_and_dicts_give_one_result_per_image(segmenter, photo):
    cat = PIL.Image.fromarray(data.chelsea())
    one = segmenter(cat, expression="the cat", max_text_tokens=0)
    listed = segmenter([photo, cat], expression=["the cup", "the cat"], max_text_tokens=0)
    dicts = segmenter(
        [{"image": photo, "expression": "the cup"}, {"image": cat, "expression": "the cat"}], max_text_tokens=0
    )
    assert len(listed) == len(dicts) == 2
    assert listed[1]["mask"].size == cat.size
    for a, b in zip(listed, dicts):
        assert np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) and a["score"] == b["score"]
    assert np.array_equal(np.asarray(one["mask"]), np.asarray(listed[1]["mask"]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda pipe, image: pipe(None, expression="the cup"), "Input 0 has no image"),
        (lambda pipe, image: pipe(image, expression=""), "non-empty `expression`"),
        (lambda pipe, image: pipe(image), "non-empty `expression`"),
        (lambda pipe, image: pipe([image, image], expression=["a"]), "one per image: 2 images"),
        (lambda pipe, image: pipe([], expression="a"), "`image` is empty"),
        (lambda pipe, image: pipe(image, expression="a", threshold=float("nan")), "`threshold` must be a finite"),
        (
            lambda pipe, image: pipe(image, expression="a", max_object_tokens=0),
            "`max_object_tokens` must be a positive",
        ),
        (
            lambda pipe, image: pipe(image, expression="a", max_text_tokens=-1),
            "`max_text_tokens` must be a non-negative",
        ),
    ],
)
def test_bad_input_is_named(segmenter, photo, call, message):
    with pytest.raises(ValueError, match=message):
        call(segmenter, photo)


def test_a_model_without_a_mask_decoder_says_how_to_build_one(photo):
    processor = tiny_processor()
    pipe = SetokimReferringSegmentationPipeline(model=tiny_setokim(processor), processor=processor)
    with pytest.raises(ValueError, match="has no mask decoder"):
        pipe(photo, expression="the cup")


REMOTE_CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""
import json
import numpy as np, PIL.Image
from transformers import pipeline

segmenter = pipeline("referring-segmentation", model=sys.argv[1], trust_remote_code=True)
result = segmenter(PIL.Image.open(sys.argv[2]), expression="the cup", max_text_tokens=1)
print(json.dumps({
    "class": type(segmenter).__module__ + "." + type(segmenter).__name__,
    "mask": (np.asarray(result["mask"]) > 0).astype(int).tolist(),
    "score": result["score"],
    "text": result["text"],
    "setok_imported": "transformers_setok" in sys.modules,
}))
"""
)


def test_exported_checkpoints_carry_the_pipeline_as_remote_code(segmenter, photo, tmp_path):
    model, processor = segmenter.model, segmenter.processor
    folder = export_setokim(model, processor, tmp_path / "export", name="tiny", repo="me/tiny")
    assert (folder / "referring_segmentation.py").is_file()
    declared = json.loads((folder / "config.json").read_text())["custom_pipelines"]
    assert list(declared) == ["referring-segmentation"]
    assert "custom_pipelines" not in model.config.to_dict()  # the live config is left as it was
    photo.save(tmp_path / "photo.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    child = subprocess.run(
        [sys.executable, "-c", REMOTE_CHILD, str(folder), str(tmp_path / "photo.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert not result["setok_imported"] and result["class"].startswith("transformers_modules.")
    expected = segmenter(photo, expression="the cup", max_text_tokens=1)
    assert np.array_equal(np.array(result["mask"], dtype=bool), np.asarray(expected["mask"]) > 0)
    assert result["score"] == pytest.approx(expected["score"], abs=1e-6) and result["text"] == expected["text"]


def test_the_segment_command_writes_masks_overlays_and_an_index(segmenter, photo, tmp_path, capsys):
    from transformers_setok.cli import main

    segmenter.model.save_pretrained(tmp_path / "model")
    segmenter.processor.save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    folder.mkdir()
    photo.save(folder / "coffee.png")
    PIL.Image.fromarray(data.chelsea()).save(folder / "cat.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    command = [
        "segment",
        str(folder),
        "--expression",
        "the cup",
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit, match="broken.png"):
        main(command)
    main(command + ["--skip-bad"])
    index = json.loads((out / "index.json").read_text())
    assert [entry["mask"] for entry in index["images"]] == ["cat_mask.png", "coffee_mask.png"]
    assert [entry["image"] for entry in index["skipped"]] == [str(folder / "broken.png")]
    mask = PIL.Image.open(out / "coffee_mask.png")
    assert mask.size == photo.size
    expected = segmenter(photo, expression="the cup")
    assert np.array_equal(np.asarray(mask), np.asarray(expected["mask"]))
    assert index["images"][1]["score"] == pytest.approx(expected["score"])
    assert PIL.Image.open(out / "coffee_overlay.png").size == photo.size


def test_the_segment_command_refuses_a_model_without_a_decoder(tmp_path):
    from transformers_setok.cli import main

    processor = tiny_processor()
    tiny_setokim(processor).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    PIL.Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    with pytest.raises(SystemExit, match="has no mask decoder"):
        main(
            [
                "segment",
                str(tmp_path / "cat.png"),
                "--expression",
                "a",
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
