"""Referring segmentation with Setokim: an image and a referring expression in, the object's mask out.

    image, expression -> "User: <image> Please segment: {expression}" (the processor's `segmentation_prompt`)
    0. encode   `model.prepare_inputs`: SeTok runs once, its outputs (the encoder grid included) are kept
    1. answer   `generate` writes the answer, the object's block `[Img] <image> x m [/Img]`: once `[Img]` is open
                only `<image>` (at least one, at most `max_object_tokens`) and `[/Img]` may follow; before it, text
                may come, but not the end of the answer (after `max_text_tokens` text tokens `[Img]` is forced)
    2. masks    one forward over prompt + answer with the same image outputs: the LLM's hidden states at the m slots
                prompt the mask decoder (`segmentation_prompts`) -> mask logits and the predicted IoU
    3. output   the logits brought back to the original image (`post_process_masks`), thresholded at 0
                (probability 1/2): a PIL "L" mask (0/255), its score and the text written before the block

Step 2 is the training forward itself (teacher forcing on the model's own answer), so a pipeline's mask equals a
direct `model(...)` call on the same ids. This file imports only torch, transformers, numpy and PIL: exported
checkpoints carry it as remote code (`custom_pipelines`), for `pipeline("referring-segmentation", model=...,
trust_remote_code=True)` without this package.
"""

import numpy as np
import PIL.Image
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Pipeline

__all__ = ["SEGMENTATION_TASK", "ObjectBlockLogitsProcessor", "SetokimReferringSegmentationPipeline"]

SEGMENTATION_TASK = "referring-segmentation"


class ObjectBlockLogitsProcessor(LogitsProcessor):
    """Keeps an answer on the shape `text [Img] <image> x m [/Img]`, 1 <= m <= `max_object_tokens`.

    Before `[Img]`: the end of the answer (`end_token_ids`), `<image>` and `[/Img]` are ruled out, and `[Img]` is
    forced after `max_text_tokens` tokens. Inside the block: `<image>` first, then `<image>` or `[/Img]`, then
    `[/Img]` once m reaches the cap. `[/Img]` ends generation (pass it as `eos_token_id`).
    """

    def __init__(self, prompt_length, boi_token_id, image_token_id, eoi_token_id, end_token_ids, max_object_tokens,
                 max_text_tokens):  # fmt: skip
        self.prompt_length = prompt_length
        self.boi, self.image, self.eoi = boi_token_id, image_token_id, eoi_token_id
        self.end = [token for token in end_token_ids if token is not None]
        self.max_object_tokens, self.max_text_tokens = max_object_tokens, max_text_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            if self.boi in ids:
                slots = len(ids) - ids.index(self.boi) - 1
                allowed = [self.image] if slots == 0 else [self.eoi] if slots >= self.max_object_tokens else None
                allowed = allowed or [self.image, self.eoi]
            elif len(ids) >= self.max_text_tokens:
                allowed = [self.boi]
            else:
                scores[row, [*self.end, self.image, self.eoi]] = -float("inf")
                continue
            keep = scores[row, allowed].clone()
            scores[row] = -float("inf")
            scores[row, allowed] = keep
        return scores


class SetokimReferringSegmentationPipeline(Pipeline):
    """Referring segmentation with a Setokim that has a mask decoder (`config.use_mask_decoder`).

    ```python
    >>> segmenter = SetokimReferringSegmentationPipeline(model=model, processor=processor)
    >>> result = segmenter(image, expression="the bag on the left")
    >>> result["mask"], result["score"], result["text"]
    ```

    Takes one image and one expression, or lists of both (one expression per image), or a list of
    `{"image": ..., "expression": ...}` dicts; returns a dict (or a list of them) with `mask` (PIL "L", the
    original image's size, 255 on the object), `score` (the predicted IoU) and `text` (what the model wrote before
    the object's block).
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, max_object_tokens=None, max_text_tokens=None, threshold=None, **kwargs):
        if kwargs:
            raise TypeError(f"Unknown arguments for referring segmentation: {sorted(kwargs)}.")
        forward = {}
        if max_object_tokens is not None:
            forward["max_object_tokens"] = _positive_int(max_object_tokens, "max_object_tokens")
        if max_text_tokens is not None:
            if isinstance(max_text_tokens, bool) or not isinstance(max_text_tokens, int) or max_text_tokens < 0:
                raise ValueError(f"`max_text_tokens` must be a non-negative integer, got {max_text_tokens!r}.")
            forward["max_text_tokens"] = max_text_tokens
        post = {}
        if threshold is not None:
            if not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
                raise ValueError(f"`threshold` must be a finite number (a logit), got {threshold!r}.")
            post["threshold"] = float(threshold)
        return {}, forward, post

    def __call__(self, image, expression=None, **kwargs):
        """`image`: a PIL image / array / path, a list of them, or a list of {"image", "expression"} dicts;
        `expression`: a text, or one per image."""
        if isinstance(image, (list, tuple)):
            if image and all(isinstance(item, dict) for item in image):
                if expression is not None:
                    raise ValueError("Pass the expressions inside the dicts of `image` or as `expression`, not both.")
                items = [_item(item.get("image"), item.get("expression"), number) for number, item in enumerate(image)]
            else:
                expressions = [expression] * len(image) if isinstance(expression, str) else expression
                if not isinstance(expressions, (list, tuple)) or len(expressions) != len(image):
                    raise ValueError(
                        f"`expression` must be one text, or one per image: {len(image)} images, got {expression!r:.80}."
                    )
                items = [_item(i, e, number) for number, (i, e) in enumerate(zip(image, expressions))]
            if not items:
                raise ValueError("`image` is empty: pass at least one image.")
            return super().__call__(items, **kwargs)
        return super().__call__(_item(image, expression, 0), **kwargs)

    def preprocess(self, item):
        image = item["image"]
        if isinstance(image, str):
            with PIL.Image.open(image) as opened:
                image = opened.convert("RGB")
        chat = [{"role": "user", "content": self.processor.segmentation_request(item["expression"])}]
        prompt = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        size = image.size[::-1] if isinstance(image, PIL.Image.Image) else np.asarray(image).shape[:2]
        return {"prompt": prompt, "image": image, "original_size": tuple(int(side) for side in size)}

    def _forward(self, model_inputs, max_object_tokens=None, max_text_tokens=32):
        model, processor = self.model, self.processor
        model.require_mask_decoder()
        config = model.config
        inputs = model.prepare_inputs(processor, [model_inputs["prompt"]], [model_inputs["image"]])
        image_outputs = inputs["mm_encoder_outputs"]["image"]
        prompt_length = inputs["input_ids"].shape[1]
        vision = config.vision_config
        max_object_tokens = max_object_tokens or vision.max_num_clusters or vision.num_patches
        block = ObjectBlockLogitsProcessor(
            prompt_length,
            config.boi_token_id,
            config.image_token_id,
            config.eoi_token_id,
            _as_list(model.generation_config.eos_token_id) + [processor.tokenizer.eos_token_id],
            max_object_tokens,
            max_text_tokens,
        )
        pad_id = processor.tokenizer.pad_token_id
        sequences = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_text_tokens + max_object_tokens + 2,
            logits_processor=LogitsProcessorList([block]),
            eos_token_id=config.eoi_token_id,
            pad_token_id=config.eoi_token_id if pad_id is None else pad_id,
        )
        answer = sequences[0, prompt_length:].tolist()
        opened = answer.index(config.boi_token_id)
        slots = torch.zeros_like(sequences, dtype=torch.bool)
        slots[0, prompt_length + opened + 1 : prompt_length + len(answer) - 1] = True
        outputs = model(
            input_ids=sequences,
            attention_mask=torch.ones_like(sequences),
            mm_encoder_outputs={"image": image_outputs},
            segmentation_prompts=slots,
            mask_image_index=torch.zeros(1, dtype=torch.long, device=sequences.device),
        )
        text = processor.tokenizer.decode(answer[:opened], skip_special_tokens=True)
        return {
            "mask_logits": outputs.pred_masks,
            "score": outputs.iou_scores,
            "text": text,
            "original_size": model_inputs["original_size"],
        }

    def postprocess(self, model_outputs, threshold: float = 0.0):
        image_processor = self.processor.image_processor
        (mask,) = image_processor.post_process_masks(
            model_outputs["mask_logits"], [model_outputs["original_size"]], threshold=threshold
        )
        return {
            "mask": PIL.Image.fromarray(mask.astype(np.uint8) * 255),
            "score": float(model_outputs["score"][0]),
            "text": model_outputs["text"].strip(),
        }


def _item(image, expression, number: int) -> dict:
    if image is None:
        raise ValueError(f"Input {number} has no image: an expression is segmented in its image.")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"Input {number} needs a non-empty `expression` text, got {expression!r}.")
    return {"image": image, "expression": expression}


# `transformers_setok._checks.check_positive_int` does this for the rest of the package; this file is shipped alone as
# remote code, so it keeps its own.
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
