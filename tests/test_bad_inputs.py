"""The bad-input matrices of the Python entry points: `SetokimProcessor` and the models (`SetokModel`, Setokim's
forward and generate, loading). Each row names the mistake and the message that must name it; later features add
rows here. (The CLI's matrix is tests/test_cli_errors.py, the training config's tests/test_train_cli.py, the data
loaders' tests/test_training_data.py, the clustering's tests/test_clustering.py.)"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import tiny_config

from transformers_setok import SetokimForConditionalGeneration, SetokModel


@dataclass
class Bad:
    call: Callable  # (model, processor, photos, tmp_path) -> anything; must raise
    message: str
    error: type = ValueError


def _ids(processor, text):
    return processor.tokenizer([text], return_tensors="pt")["input_ids"]


def _pixels(processor, photos, count):
    return processor.image_processor([photos["coffee"]] * count, return_tensors="pt")["pixel_values"]


def _count(model, processor, photos):
    return len(model.get_image_features(_pixels(processor, photos, 1)).pooler_output[0])


PROCESSOR = {
    "counts for fewer images than given": Bad(
        lambda m, p, photos, t: p(text="<image> <image>", images=[photos["coffee"]] * 2, image_token_counts=[3]),
        "`image_token_counts` has 1 entries for 2 images",
    ),
    "a count that is not positive": Bad(
        lambda m, p, photos, t: p(text="<image>", images=[photos["coffee"]], image_token_counts=[0]),
        "`image_token_counts` must hold positive integers, got 0",
    ),
    "nested images that do not match their prompts": Bad(
        lambda m, p, photos, t: p(text=["<image> <image> a", "b"], images=[[photos["coffee"]]] * 2),
        r"Prompt 0 of `text` holds 2 <image> placeholders but `images\[0\]` holds 1 images",
    ),
    "one list of images too many": Bad(
        lambda m, p, photos, t: p(text=["<image>", "<image>", "a"], images=[[photos["coffee"]], [photos["coffee"]]]),
        "`images` holds 2 lists of images for 3 prompts",
    ),
    "a placeholder without its image": Bad(
        lambda m, p, photos, t: p(text="what is <image> ?"), "tokens in the text but no images were passed"
    ),
    "an image that is no image": Bad(
        lambda m, p, photos, t: p(text="<image>", images=[42]), "`images` must be PIL images", error=TypeError
    ),
    "an empty conversation": Bad(lambda m, p, photos, t: p.apply_chat_template([]), "`conversation` is empty"),
    "a zero-token image block": Bad(lambda m, p, photos, t: p.image_block(0), "positive integer, got 0"),
}

MODEL = {
    "more images than placeholders": Bad(
        lambda m, p, photos, t: m.generate(input_ids=_ids(p, "a <image>"), pixel_values=_pixels(p, photos, 2)),
        "the prompts hold 1 `<image>` placeholders but 2 images were given",
    ),
    "fewer images than placeholders": Bad(
        lambda m, p, photos, t: m.generate(input_ids=_ids(p, "<image> <image>"), pixel_values=_pixels(p, photos, 1)),
        "the prompts hold 2 `<image>` placeholders but 1 images were given",
    ),
    "placeholders and no image": Bad(
        lambda m, p, photos, t: m.generate(input_ids=_ids(p, "a <image>")),
        "hold 1 `<image>` placeholders but 0 images were given",
    ),
    "an expansion that is not SeTok's count": Bad(
        lambda m, p, photos, t: m.generate(
            **p(
                text=["<image>"],
                images=[photos["coffee"]],
                image_token_counts=[_count(m, p, photos) + 1],
                return_tensors="pt",
            )
        ),
        r"image 0 is expanded to \d+ `<image>` tokens, but SeTok gives it \d+",
    ),
    "expanded and unexpanded images mixed": Bad(
        lambda m, p, photos, t: m.generate(
            input_ids=_ids(p, "[Img] <image> [/Img] <image>"), pixel_values=_pixels(p, photos, 2)
        ),
        "mix unexpanded `<image>` placeholders with expanded",
    ),
    "pixel values and features together": Bad(
        lambda m, p, photos, t: m.generate(
            input_ids=_ids(p, "<image>"),
            pixel_values=_pixels(p, photos, 1),
            mm_encoder_outputs={"image": m.get_image_features(_pixels(p, photos, 1))},
        ),
        "Pass either `pixel_values` or `mm_encoder_outputs",
    ),
    "an image block closed that was never opened": Bad(
        lambda m, p, photos, t: m.generate(input_ids=_ids(p, "a [/Img]")), "closes an image block"
    ),
    "a forward with image tokens and no image": Bad(
        lambda m, p, photos, t: m(input_ids=_ids(p, "[Img] <image> <image> [/Img]")),
        "Image features and image tokens do not match",
    ),
    "a prompt longer than the context": Bad(
        lambda m, p, photos, t: m(input_ids=torch.ones(1, m.config.text_config.max_position_embeddings + 1).long()),
        "longer than the language model's context",
    ),
    "a checkpoint of another model type": Bad(
        lambda m, p, photos, t: SetokimForConditionalGeneration.from_pretrained(_bert_folder(t)),
        "model type 'bert'",
    ),
    "SeTok given NaN pixels": Bad(
        lambda m, p, photos, t: SetokModel(tiny_config())(torch.full((1, 3, 32, 32), float("nan"))), "pixel_values"
    ),
    "SeTok given the wrong channel count": Bad(
        lambda m, p, photos, t: SetokModel(tiny_config())(torch.zeros(1, 4, 32, 32)), "pixel_values"
    ),
    "SeTok loading a checkpoint of another model type": Bad(
        lambda m, p, photos, t: SetokModel.from_pretrained(_bert_folder(t)), "model type 'bert'"
    ),
}


def _bert_folder(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", list(PROCESSOR), ids=list(PROCESSOR))
def test_processor_bad_input(case, processor, photos, tmp_path):
    bad = PROCESSOR[case]
    with pytest.raises(bad.error, match=bad.message):
        bad.call(None, processor, photos, tmp_path)


@pytest.mark.parametrize("case", list(MODEL), ids=list(MODEL))
def test_model_bad_input(case, model, processor, photos, tmp_path):
    bad = MODEL[case]
    with pytest.raises(bad.error, match=bad.message), torch.no_grad():
        bad.call(model, processor, photos, tmp_path)


def test_good_inputs_next_to_the_bad_ones_work(model, processor, photos):
    """The rows' good neighbours, so that a row fails for its mistake and not for its set-up."""
    inputs = processor(text=["<image> a"], images=[photos["coffee"]], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=1).shape[1] == inputs["input_ids"].shape[1] + 1
    assert SetokModel(tiny_config())(torch.zeros(1, 3, 32, 32)).num_tokens.shape == (1,)
    with torch.no_grad():
        assert np.isfinite(float(model(input_ids=_ids(processor, "a cat")).logits.sum()))
