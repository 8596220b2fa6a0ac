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
from ..generation import revealed_counts

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
        """
        model = self.model
        model.require_generation_head()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be one torch.Generator, got {type(generator).__name__}.")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"`output_type` must be 'pil' or 'pt', got {output_type!r}.")
        check_positive_int(num_unmasking_rounds, "num_unmasking_rounds")
        vision = model.config.vision_config
        max_image_tokens = max_image_tokens or vision.max_num_clusters or vision.num_patches
        check_positive_int(max_image_tokens, "max_image_tokens")

        texts, inputs = self._encode_prompts(prompt)
        num_tokens = self._image_lengths(inputs, max_image_tokens, sample_length, generator)
        tokens = self._draw_tokens(
            texts,
            num_tokens,
            num_inference_steps or model.config.diffusion_num_inference_steps,
            num_unmasking_rounds,
            generator,
        )
        pixels = model.decode_image_tokens(tokens, num_tokens)
        images = self.processor.image_processor.postprocess(pixels) if output_type == "pil" else pixels
        image_tokens = [row[:n] for row, n in zip(tokens, num_tokens.tolist())]
        self.maybe_free_model_hooks()
        return SetokimImageGenerationOutput(images=images, image_tokens=image_tokens)

    # --- step 0: the prompts -----------------------------------------------------------------------------------------

    def _encode_prompts(self, prompt) -> tuple[list[str], dict]:
        """Each prompt rendered with the chat template and the generation prompt; and those texts opening an image
        (`[Img]`), tokenized with left padding."""
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
        return texts, inputs.to(self.model.device)

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

    def _draw_tokens(self, texts, num_tokens, num_inference_steps, num_rounds, generator) -> torch.Tensor:
        model, config, processor = self.model, self.model.config, self.processor
        device = model.device
        batch, longest = len(num_tokens), int(num_tokens.max())
        slots = torch.arange(longest, device=device)[None] < num_tokens[:, None]  # (B, L) real image slots
        # Each prompt followed by its image of n slots, as the processor spells an image.
        blocks = [text + processor.image_block(int(n)) for text, n in zip(texts, num_tokens)]
        # (The tokenizer itself: the processor refuses `<image>` without images, and these slots have none yet.)
        inputs = processor.tokenizer(blocks, return_tensors="pt", padding=True, padding_side="left").to(device)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
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
            hidden = torch.zeros_like(slot_positions)
            hidden[slot_positions] = (~known)[slots]
            conditions = model.image_token_conditions(
                input_ids, attention_mask, hidden, [tokens[b][known[b]] for b in range(batch)]
            )
            condition = conditions[due[slots & ~known]]  # the hidden slots due this round, in the same order
            tokens[due] = self._denoise(condition, token_dim, num_inference_steps, generator) / token_scale
            known |= due
        return tokens

    def _denoise(self, condition, token_dim, num_inference_steps, generator) -> torch.Tensor:
        """One SeTok token per row of `condition` `(N, hidden_size)`, drawn by the scheduler's denoising loop."""
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=condition.device)
        sample = randn_tensor((len(condition), token_dim), generator=generator, device=condition.device)
        sample = sample * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            prediction = self.model.run_generation_head(model_input, t, condition).float()
            sample = scheduler.step(prediction, t, sample, generator=generator).prev_sample
        return sample


def _device_of(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
