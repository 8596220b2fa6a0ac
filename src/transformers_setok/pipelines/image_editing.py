"""Image editing with Setokim: the source image and an instruction in, the edited image drawn as text-to-image draws
(`pipelines._sampling`: token count from the LLM, MAR-style unmasking rounds, the diffusion head, SeTok's detokenizer).

    image, instruction -> chat "User: <source image> {instruction}" (training's `editing_messages`) -> "Assistant: "
    [Img]
    0. source     SeTok runs once on the source images; each row's placeholder becomes `[Img]`, its n_s tokens,
                  `[/Img]` (`model.encode_and_expand`), and every LLM pass below reads those same tokens there
    1. length     sampled from the LLM after `[Img]` opens (greedy with `sample_length=False`): n tokens
    2. tokens     the unmasking rounds over the chat and the n slots, as text-to-image
    3. pixels     `model.decode_image_tokens`

Guidance (InstructPix2Pix; `generation.guidance`): the null conditions are the chat without its instruction's tokens
(`generation.user_text_spans`, what training's text dropout removes) and, for the image, without the source's
placeholder (what training's image dropout removes: its whole block). With a text scale s_T and an image scale s_I:

    s_T = s_I = 1     the full chat only: no extra rows
    s_I = 1           two-way: uncond = the chat without its text (the source kept), `uncond + s_T (full - uncond)`
    s_I != 1          three-way: rows [full; without text; without text and image],
                      `uncond + s_I (image_only - uncond) + s_T (full - image_only)`

With s_I = 1 the three-way combination is the two-way one, so it reads only two variants. The length always comes
from the full chat.
"""

import torch

from ..generation.guidance import check_guidance_scale, classifier_free_guidance, instruct_pix2pix_guidance
from ._sampling import SetokimImageGenerationOutput, SetokimSamplingPipeline

__all__ = ["SetokimImageEditingPipeline"]


class SetokimImageEditingPipeline(SetokimSamplingPipeline):
    """Instruction-based image editing with a Setokim that has a generation head (`config.use_generation_head`),
    trained on editing chats (stage 3, `training.data.edits_to_messages`).

    ```python
    >>> pipe = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    >>> pipe(image=photo, prompt="replace the bag with a sneaker", generator=torch.Generator().manual_seed(0)).images[0]
    ```
    """

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] | None = None,
        guidance_scale: float = 1.0,
        image_guidance_scale: float = 1.0,
        num_inference_steps: int | None = None,
        num_unmasking_rounds: int = 8,
        max_image_tokens: int | None = None,
        sample_length: bool = True,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> SetokimImageGenerationOutput:
        r"""
        image: the source image (a PIL image, numpy array or tensor the image processor takes), or a list of them.
        prompt: the instruction, or one per image (one instruction applies to every image).
        guidance_scale: the text scale s_T, a finite number >= 0 (1: no text guidance).
        image_guidance_scale: the image scale s_I, a finite number >= 0 (1: no image guidance); s_I != 1 reads three
            variants of each chat. Guidance needs a model trained with condition dropout.
        num_inference_steps: denoising steps per token (default `config.diffusion_num_inference_steps`).
        num_unmasking_rounds: unmasking rounds (at most one per token).
        max_image_tokens: cap on the output's token count (default SeTok's `max_num_clusters`, else its patches).
        sample_length: sample the token count from the LLM (True) or take the greedy one.
        generator: one `torch.Generator` for reproducible edits.
        output_type: "pil" or "pt" (normalised pixel tensors).
        """
        model = self.model
        model.require_generation_head()
        text_scale = check_guidance_scale(guidance_scale, "guidance_scale")
        image_scale = check_guidance_scale(image_guidance_scale, "image_guidance_scale")
        max_image_tokens = self._check_sampling_arguments(
            generator, output_type, num_unmasking_rounds, max_image_tokens
        )
        images, instructions = _check_edits(image, prompt)

        chats = [[editing_request(instruction)] for instruction in instructions]
        texts = self._render(chats)
        ids, text_flags = self._tokenize(chats, texts)
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        full, image_outputs = self._expanded(ids, pixel_values=pixel_values.to(model.device))
        sources = [[tokens[:n]] for tokens, n in zip(image_outputs.last_hidden_state, _counts(image_outputs))]
        num_tokens = self._image_lengths(
            {**full, "mm_encoder_outputs": {"image": image_outputs}}, max_image_tokens, sample_length, generator
        )

        # Each variant: its rows (prompt, then the slots) and the source tokens its rows read.
        variants = [(_rows(full), sources)]
        guide = None
        if text_scale != 1.0 or image_scale != 1.0:
            without_text = [[t for t, drop in zip(row, flags) if not drop] for row, flags in zip(ids, text_flags)]
            variants.append((_rows(self._expanded(without_text, image_outputs=image_outputs)[0]), sources))
            if image_scale == 1.0:

                def guide(full, no_text):
                    return classifier_free_guidance(no_text, full, text_scale)

            else:
                image_id = model.config.image_token_id
                neither = [[t for t in row if t != image_id] for row in without_text]
                variants.append((_rows(self._expanded(neither)[0]), [[] for _ in sources]))

                def guide(full, image_only, uncond):
                    return instruct_pix2pix_guidance(uncond, image_only, full, text_scale, image_scale)

        slots = [[model.config.image_token_id] * int(n) + [model.config.eoi_token_id] for n in num_tokens]
        tokens = self._draw_tokens(
            self._left_padded(*([prefix + own for prefix, own in zip(rows, slots)] for rows, _ in variants)),
            num_tokens,
            num_inference_steps or model.config.diffusion_num_inference_steps,
            num_unmasking_rounds,
            generator,
            guide=guide,
            input_images=[images_of_row for _, row_images in variants for images_of_row in row_images],
        )
        return self._decoded(tokens, num_tokens, output_type)

    def _tokenize(self, chats, texts) -> tuple[list[list[int]], list[list[bool]]]:
        """Each rendering opened with `[Img]`, as ids with its one unexpanded source placeholder, and the flags of
        its instruction's tokens."""
        processor = self.processor
        ids, flags = [], []
        for index, (chat, text) in enumerate(zip(chats, texts)):
            # (The tokenizer itself: the processor would expand or check the placeholder against images.)
            encoded = processor.tokenizer(text + processor.boi_token, return_offsets_mapping=True)
            row = encoded["input_ids"]
            found = row.count(processor.image_token_id)
            if found != 1 or row[-1] != processor.boi_token_id:
                raise ValueError(
                    f"The editing chat of `prompt[{index}]` must render to one {processor.image_token} (the source "
                    f"image) and end with {processor.boi_token}; it holds {found} (does the instruction hold an "
                    "image token?)."
                )
            ids.append(row)
            flags.append(self._user_text_flags(chat, text, encoded["offset_mapping"]))
        return ids, flags

    def _expanded(self, rows: list[list[int]], pixel_values=None, image_outputs=None) -> tuple[dict, object]:
        """Rows of ids with unexpanded placeholders -> left-padded `input_ids`, `attention_mask`, each placeholder
        expanded to its image's block by the model (SeTok run on `pixel_values`, or `image_outputs` reused)."""
        tokenizer = self.processor.tokenizer
        batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt", padding=True, padding_side="left")
        return self.model.encode_and_expand(
            dict(batch.to(self.model.device)),
            pixel_values,
            image_outputs=image_outputs,
            padding_side="left",
            pad_token_id=tokenizer.pad_token_id,
        )


def editing_request(instruction: str) -> dict:
    """The user turn of an edit: the source image, then the instruction (`training.data.editing_messages`)."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}


def _check_edits(image, prompt) -> tuple[list, list[str]]:
    """The source images and one instruction per image, or ValueError naming the argument."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images or any(item is None for item in images):
        raise ValueError("`image` is required: the source image to edit (or a non-empty list of them), got None.")
    instructions = [prompt] * len(images) if isinstance(prompt, str) or prompt is None else list(prompt)
    if len(instructions) != len(images):
        raise ValueError(f"`prompt` holds {len(instructions)} instructions for {len(images)} images in `image`.")
    for instruction in instructions:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"`prompt` must be a non-empty instruction (what to change), got {instruction!r}.")
    return images, instructions


def _counts(image_outputs) -> list[int]:
    return [len(features) for features in image_outputs.pooler_output]


def _rows(batch: dict) -> list[list[int]]:
    """A left-padded batch's rows without their padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
