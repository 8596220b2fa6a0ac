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

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_positive_int
from ..generation import (
    check_guidance_scale,
    classifier_free_guidance,
    revealed_counts,
    tokens_in_spans,
    user_text_spans,
)

__all__ = ["SetokimImageGenerationOutput", "SetokimTextToImagePipeline"]


@dataclass
class SetokimImageGenerationOutput(BaseOutput):
    """
    images (`list[PIL.Image.Image]` or `torch.Tensor`): the images, or their `(B, 3, H, W)` normalised pixels with
        `output_type="pt"`.
    image_tokens (`list[torch.Tensor]`): the drawn SeTok tokens of each image, `(n_b, token_dim)`.
    """

    images: list | torch.Tensor
    image_tokens: list


class SetokimTextToImagePipeline(DiffusionPipeline):
    """Text-to-image with a Setokim that has a generation head (`config.use_generation_head`).

    ```python
    >>> pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    >>> pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0)).images[0]
    ```
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model, processor, scheduler):
        super().__init__()
        self.register_modules(model=model, processor=processor, scheduler=scheduler)

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
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be one torch.Generator, got {type(generator).__name__}.")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"`output_type` must be 'pil' or 'pt', got {output_type!r}.")
        check_positive_int(num_unmasking_rounds, "num_unmasking_rounds")
        vision = model.config.vision_config
        max_image_tokens = max_image_tokens or vision.max_num_clusters or vision.num_patches
        check_positive_int(max_image_tokens, "max_image_tokens")

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
        pixels = model.decode_image_tokens(tokens, num_tokens)
        images = self.processor.image_processor.postprocess(pixels) if output_type == "pil" else pixels
        image_tokens = [row[:n] for row, n in zip(tokens, num_tokens.tolist())]
        self.maybe_free_model_hooks()
        return SetokimImageGenerationOutput(images=images, image_tokens=image_tokens)

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
        texts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
        opened = [text + processor.boi_token for text in texts]
        inputs = processor(text=opened, return_tensors="pt", padding=True, padding_side="left")
        if bool((inputs["input_ids"] == processor.image_token_id).any()):
            raise ValueError("Prompts with input images are not supported by text-to-image generation yet.")
        return chats, texts, inputs.to(self.model.device)

    # --- step 1: how many tokens ---------------------------------------------------------------------------------------

    def _image_lengths(self, inputs, max_image_tokens: int, sample: bool, generator) -> torch.Tensor:
        config = self.model.config
        image_id, eoi_id = config.image_token_id, config.eoi_token_id
        prompt_length = inputs["input_ids"].shape[1]

        def allowed(batch_id, ids):
            drawn = int((ids[prompt_length:] == image_id).sum())
            if drawn == 0:
                return [image_id]
            return [eoi_id] if drawn >= max_image_tokens or ids[-1] == eoi_id else [image_id, eoi_id]

        pad_id = self.processor.tokenizer.pad_token_id
        options = dict(
            max_new_tokens=max_image_tokens + 1,
            prefix_allowed_tokens_fn=allowed,
            eos_token_id=eoi_id,
            pad_token_id=eoi_id if pad_id is None else pad_id,
        )
        if not sample:
            sequences = self.model.generate(**inputs, do_sample=False, **options)
        else:
            # `generate` samples from the global RNG: seed it from `generator`, leaving the caller's RNG untouched.
            seed = int(torch.randint(2**62, (1,), generator=generator, device=_device_of(generator)))
            devices = [self.model.device] if self.model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                sequences = self.model.generate(
                    **inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **options
                )
        return (sequences[:, prompt_length:] == image_id).sum(1)

    # --- step 2: the tokens ---------------------------------------------------------------------------------------------

    def _left_padded(self, *groups: list) -> dict:
        """Rows of text (tokenized here) or of token ids -> `input_ids`, `attention_mask` `(V * B, T)`, left padded,
        group after group (the conditional rows, then each null variant's)."""
        tokenizer = self.processor.tokenizer
        # (The tokenizer itself: the processor refuses `<image>` without images, and these slots have none yet.)
        rows = [tokenizer(row)["input_ids"] if isinstance(row, str) else row for group in groups for row in group]
        inputs = tokenizer.pad({"input_ids": rows}, return_tensors="pt", padding=True, padding_side="left")
        return inputs.to(self.model.device)

    def _without_user_text(self, chats, texts, rows) -> list[list[int]]:
        """Each row's ids without the tokens of its chat's user text: the null condition, found as training's
        condition dropout finds it (the tokens whose characters overlap the text, `generation.user_text_spans`)."""
        processor = self.processor
        null_rows = []
        for chat, text, row in zip(chats, texts, rows):
            _, spans = user_text_spans(
                lambda messages: processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                chat,
                rendered=text,
            )
            encoded = processor.tokenizer(row, return_offsets_mapping=True)
            in_text = tokens_in_spans(encoded["offset_mapping"], spans)
            null_rows.append([token for token, drop in zip(encoded["input_ids"], in_text) if not drop])
        return null_rows

    def _draw_tokens(self, inputs, num_tokens, num_inference_steps, num_rounds, generator, guide=None) -> torch.Tensor:
        """The n_b tokens of each image `(B, L, token_dim)`, drawn in `num_rounds` rounds. `inputs`: the prompts
        followed by their images' slots, `(V * B, T)`: V variants of the B rows with the same slots (the conditional
        rows, then for guidance the null ones); `guide(*predictions)` combines the V predictions of the head."""
        model, config = self.model, self.model.config
        device = model.device
        batch, longest = len(num_tokens), int(num_tokens.max())
        slots = torch.arange(longest, device=device)[None] < num_tokens[:, None]  # (B, L) real image slots
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        variants = len(input_ids) // batch
        slot_positions = input_ids == config.image_token_id  # row-major: slot j of row b is b's j-th `<image>`

        token_dim = config.vision_config.token_dim
        token_scale = config.generation_token_scale or 1.0  # the head draws scaled tokens (see SetokimConfig)
        tokens = torch.zeros(batch, longest, token_dim, device=device)
        known = torch.zeros(batch, longest, dtype=torch.bool, device=device)
        rounds = min(num_rounds, longest)
        orders = [
            torch.randperm(int(n), generator=generator, device=_device_of(generator)).to(device) for n in num_tokens
        ]
        schedules = [revealed_counts(int(n), rounds) for n in num_tokens]
        for k in self.progress_bar(range(rounds)):
            due = torch.zeros_like(known)
            for b in range(batch):
                start = 0 if k == 0 else schedules[b][k - 1]
                due[b, orders[b][start : schedules[b][k]]] = True
            if not bool(due.any()):
                continue
            # Every round re-reads the prompts: reusing their KV cache would need `image_token_conditions` (the
            # model's public entry, which projects the drawn tokens) to take a cache.
            hidden = torch.zeros_like(slot_positions)
            hidden[slot_positions] = (~known)[slots].repeat(variants)
            conditions = model.image_token_conditions(
                input_ids, attention_mask, hidden, [tokens[b][known[b]] for b in range(batch)] * variants
            )
            # The hidden slots due this round, in the same order, for each variant: (V, N, hidden_size).
            condition = conditions.view(variants, -1, conditions.shape[-1])[:, due[slots & ~known]]
            if guide is None:
                drawn = self._denoise(condition[0], token_dim, num_inference_steps, generator)
            else:
                drawn = self._denoise(condition, token_dim, num_inference_steps, generator, guide=guide)
            tokens[due] = drawn / token_scale
            known |= due
        return tokens

    def _denoise(self, condition, token_dim, num_inference_steps, generator, guide=None) -> torch.Tensor:
        """One SeTok token per row of `condition` `(N, hidden_size)`, drawn by the scheduler's denoising loop; or,
        with `guide`, per column of `condition` `(V, N, hidden_size)`: each step's V predictions of the head (on the
        same sample) combined by `guide(*predictions)`."""
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=condition.device)
        variants = 1 if guide is None else len(condition)
        count = condition.shape[-2]
        sample = randn_tensor((count, token_dim), generator=generator, device=condition.device)
        sample = sample * scheduler.init_noise_sigma
        conditions = condition.reshape(variants * count, -1)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            if guide is None:
                prediction = self.model.run_generation_head(model_input, t, condition).float()
            else:
                predictions = self.model.run_generation_head(model_input.repeat(variants, 1), t, conditions).float()
                prediction = guide(*predictions.view(variants, count, -1))
            sample = scheduler.step(prediction, t, sample, generator=generator).prev_sample
        return sample


def _device_of(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
