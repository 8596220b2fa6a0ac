"""Text-to-image with Setokim: the LLM decides how many tokens the image has, the diffusion head draws them (MAR-style
masked unmasking), SeTok's detokenizer paints them.

    prompt -> chat template -> ... "Assistant: " [Img]
    1. length     `generate` (sampled; greedy with `sample_length=False`), allowed tokens `<image>` (at least one) and
                  `[/Img]`: n tokens
    2. tokens     K rounds; in each, the LLM reads the prompt and the n slots (drawn tokens projected, the rest the
                  `<image>` mask embedding); the hidden states of the slots due this round condition the head, and a
                  diffusers scheduler runs the denoising loop. The number still hidden follows MAR's cosine schedule
                  cos(pi/2 * k/K), in a random order.
    3. pixels     `model.decode_image_tokens` -> the image processor's normalisation undone -> PIL images

Classifier-free guidance (`guidance_scale` s != 1): each round's LLM pass also reads the null chat, the same prompt
without its user text (the condition a model trained with `condition_text_dropout` or `condition_both_dropout` has
seen, cut out the same way: `generation.user_text_spans`), with the same slots, in one batch of [cond; uncond]
rows; at every denoising step the head's prediction is `uncond + s (cond - uncond)`
(`generation.classifier_free_guidance`), on the same noise. The length (step 1) comes from the conditional prompt
alone. s = 1 runs no unconditional pass: the samples are those of the sampler without guidance, bit for bit.

The schedule is `transformers_setok.generation.noise_scheduler_for(model.config)`, the one the head was trained with.
Another diffusers sampler may replace it if built on the same schedule and prediction type, e.g.
`DDIMScheduler.from_config(noise_scheduler_for(model.config).config)`.
"""

import torch

from ..generation.guidance import check_guidance_scale, classifier_free_guidance
from ._sampling import SetokimImageGenerationOutput, SetokimSamplingPipeline

__all__ = ["SetokimImageGenerationOutput", "SetokimTextToImagePipeline"]


class SetokimTextToImagePipeline(SetokimSamplingPipeline):
    """Text-to-image with a Setokim that has a generation head (`config.use_generation_head`).

    ```python
    >>> pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    >>> pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0)).images[0]
    ```
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | list[dict] | list[list[dict]],
        num_inference_steps: int | None = None,
        num_unmasking_rounds: int = 8,
        max_image_tokens: int | None = None,
        sample_length: bool = True,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        guidance_scale: float = 1.0,
    ) -> SetokimImageGenerationOutput:
        r"""
        prompt: a text, a chat (list of messages) or a list of either; each asks for one image.
        num_inference_steps: denoising steps per token (default `config.diffusion_num_inference_steps`).
        num_unmasking_rounds: rounds of step 2 (at most one per token).
        max_image_tokens: cap on an image's token count (default SeTok's `max_num_clusters`, else its patch count).
        sample_length: sample the token count from the LLM (True) or take the greedy one, which tends to overshoot:
            it stops only once `[/Img]` is more likely than another `<image>`.
        generator: one `torch.Generator` (on any device) for reproducible images.
        output_type: "pil" or "pt" (normalised pixel tensors).
        guidance_scale: classifier-free guidance's scale s, a finite number >= 0: 1 (the default) draws from the
            prompt alone, s > 1 pushes the head's predictions away from the prompt without its text, 0 draws from
            that null prompt alone (the length is always the prompt's). It needs a model trained with condition
            dropout; the LLM reads twice the rows.
        """
        model = self.model
        model.require_generation_head()
        guidance_scale = check_guidance_scale(guidance_scale)
        max_image_tokens = self._check_sampling_arguments(
            generator, output_type, num_unmasking_rounds, max_image_tokens
        )

        chats, texts, inputs = self._encode_prompts(prompt)
        num_tokens = self._image_lengths(inputs, max_image_tokens, sample_length, generator)
        rows = [text + self.processor.image_block(int(n)) for text, n in zip(texts, num_tokens)]
        guided = guidance_scale != 1.0
        # With guidance, the null chats' rows follow: each row without its user text's tokens, the same slots.
        groups = [rows, self._without_user_text(chats, texts, rows)] if guided else [rows]
        tokens = self._draw_tokens(
            self._left_padded(*groups),
            num_tokens,
            num_inference_steps or model.config.diffusion_num_inference_steps,
            num_unmasking_rounds,
            generator,
            guide=(lambda cond, uncond: classifier_free_guidance(uncond, cond, guidance_scale)) if guided else None,
        )
        return self._decoded(tokens, num_tokens, output_type)

    # --- step 0: the prompts -----------------------------------------------------------------------------------------

    def _encode_prompts(self, prompt) -> tuple[list[list[dict]], list[str], dict]:
        """The prompts as chats; each rendered with the chat template and the generation prompt; and those texts
        opening an image (`[Img]`), tokenized with left padding."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("`prompt` must be a text, a chat (list of messages) or a non-empty list of them.")
        chats = []
        for item in prompt:
            if isinstance(item, str):
                item = [{"role": "user", "content": [{"type": "text", "text": item}]}]
            if not isinstance(item, list) or not all(isinstance(message, dict) for message in item):
                raise ValueError(f"Each prompt must be a text or a list of message dicts, got {item!r:.80}.")
            chats.append(item)
        processor = self.processor
        texts = self._render(chats)
        opened = [text + processor.boi_token for text in texts]
        inputs = processor(text=opened, return_tensors="pt", padding=True, padding_side="left")
        if bool((inputs["input_ids"] == processor.image_token_id).any()):
            raise ValueError("Prompts with input images are not supported by text-to-image generation yet.")
        return chats, texts, inputs.to(self.model.device)

    # --- step 2: the null condition ---------------------------------------------------------------------------------

    def _without_user_text(self, chats, texts, rows) -> list[list[int]]:
        """Each row's ids without the tokens of its chat's user text: the null condition, found as training's
        condition dropout finds it (the tokens whose characters overlap the text, `generation.user_text_spans`)."""
        null_rows = []
        for chat, text, row in zip(chats, texts, rows):
            encoded = self.processor.tokenizer(row, return_offsets_mapping=True)
            in_text = self._user_text_flags(chat, text, encoded["offset_mapping"])
            null_rows.append([token for token, drop in zip(encoded["input_ids"], in_text) if not drop])
        return null_rows
