"""What the pipelines that draw an image with Setokim's generation head share (`text_to_image`, `image_editing`):
the checks of their common arguments, the token count sampled from the LLM once `[Img]` opens, the MAR-style
unmasking rounds over the LLM's hidden states, the scheduler's denoising loop (optionally guided) and the decoding to
pixels. Each pipeline builds its own prompts (and null conditions) and calls these steps."""

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_positive_int
from ..generation.conditions import tokens_in_spans, user_text_spans
from ..generation.schedule import revealed_counts

__all__ = ["SetokimImageGenerationOutput", "SetokimSamplingPipeline"]


@dataclass
class SetokimImageGenerationOutput(BaseOutput):
    """
    images (`list[PIL.Image.Image]` or `torch.Tensor`): the images, or their `(B, 3, H, W)` normalised pixels with
        `output_type="pt"`.
    image_tokens (`list[torch.Tensor]`): the drawn SeTok tokens of each image, `(n_b, token_dim)`.
    """

    images: list | torch.Tensor
    image_tokens: list


class SetokimSamplingPipeline(DiffusionPipeline):
    """The steps of drawing images with a Setokim that has a generation head; subclasses write `__call__`.

    `reuse_prefix_cache` (default True): the unmasking rounds read the columns before the images' slots (the chats, an
    edit's source block, `[Img]`) once, into a KV cache (`model.image_token_prefix_cache`), and each round runs the LLM
    on the slots only. False re-reads the whole prompts in every round: the same tokens up to float rounding, slower.
    """

    model_cpu_offload_seq = "model"
    reuse_prefix_cache = True

    def __init__(self, model, processor, scheduler):
        super().__init__()
        self.register_modules(model=model, processor=processor, scheduler=scheduler)

    # --- arguments -----------------------------------------------------------------------------------------------------

    def _check_sampling_arguments(self, generator, output_type, num_unmasking_rounds, max_image_tokens) -> int:
        """Checks the arguments every sampler takes; returns `max_image_tokens` with its default filled in."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be one torch.Generator, got {type(generator).__name__}.")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"`output_type` must be 'pil' or 'pt', got {output_type!r}.")
        check_positive_int(num_unmasking_rounds, "num_unmasking_rounds")
        vision = self.model.config.vision_config
        max_image_tokens = max_image_tokens or vision.max_num_clusters or vision.num_patches
        check_positive_int(max_image_tokens, "max_image_tokens")
        return max_image_tokens

    def _render(self, chats: list[list[dict]]) -> list[str]:
        """Each chat rendered with the chat template and the generation prompt."""
        processor = self.processor
        return [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]

    def _user_text_flags(self, chat, text, offsets) -> list[bool]:
        """One flag per token of character `offsets` into a row that begins with `text` (`chat`'s rendering): True on
        the tokens of its user text, the null condition's cut found as training's condition dropout finds it
        (`generation.user_text_spans`)."""
        processor = self.processor
        _, spans = user_text_spans(
            lambda messages: processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            chat,
            rendered=text,
        )
        return tokens_in_spans(offsets, spans)

    # --- step 1: how many tokens ---------------------------------------------------------------------------------------

    def _image_lengths(self, inputs, max_image_tokens: int, sample: bool, generator) -> torch.Tensor:
        """`(B,)` token counts sampled (or greedy) from the LLM on `inputs` (left padded, ending with `[Img]`; with
        `mm_encoder_outputs` when the prompts hold images), allowed `<image>` (at least one) and `[/Img]`."""
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

    def _draw_tokens(
        self, inputs, num_tokens, num_inference_steps, num_rounds, generator, guide=None, input_images=None
    ) -> torch.Tensor:
        """The n_b tokens of each image `(B, L, token_dim)`, drawn in `num_rounds` rounds. `inputs`: the prompts
        followed by their images' slots (the last `[Img]` block of each row), `(V * B, T)`: V variants of the B rows
        with the same slots (the conditional rows, then for guidance the null ones); `guide(*predictions)` combines
        the V predictions of the head. `input_images`: per row of `inputs`, the SeTok tokens `(n_i, token_dim)` of the
        expanded image blocks before the slots (an edit's source), given whole to every pass (None: none). With
        `reuse_prefix_cache`, the columns before the earliest slot are read once, into a KV cache every round reuses."""
        model, config = self.model, self.model.config
        device = model.device
        batch, longest = len(num_tokens), int(num_tokens.max())
        slots = torch.arange(longest, device=device)[None] < num_tokens[:, None]  # (B, L) real image slots
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        variants = len(input_ids) // batch
        # The slots are the `<image>` tokens after a row's last `[Img]` (no `[Img]` follows them); row-major: slot j
        # of row b is b's j-th.
        blocks_after = (input_ids == config.boi_token_id).flip(-1).cumsum(-1).flip(-1)
        slot_positions = (input_ids == config.image_token_id) & (blocks_after == 0)

        token_dim = config.vision_config.token_dim
        token_scale = config.generation_token_scale or 1.0  # the head draws scaled tokens (see SetokimConfig)
        tokens = torch.zeros(batch, longest, token_dim, device=device)
        known = torch.zeros(batch, longest, dtype=torch.bool, device=device)

        def pass_inputs():
            """This round's `masked_image_tokens` `(V * B, T)` and visible tokens per image, in placeholder order."""
            hidden = torch.zeros_like(slot_positions)
            hidden[slot_positions] = (~known)[slots].repeat(variants)
            drawn_so_far = [tokens[b][known[b]] for b in range(batch)] * variants
            if input_images is not None:  # per row, its input images then its drawn image, in placeholder order
                drawn_so_far = [t for images, own in zip(input_images, drawn_so_far) for t in (*images, own)]
            return hidden, drawn_so_far

        rounds = min(num_rounds, longest)
        orders = [
            torch.randperm(int(n), generator=generator, device=_device_of(generator)).to(device) for n in num_tokens
        ]
        schedules = [revealed_counts(int(n), rounds) for n in num_tokens]
        # Nothing before the earliest slot of any row changes between rounds and the LLM is causal: its KV cache, built
        # once (per variant's rows, input images projected once), serves every round.
        prefix_cache = None
        if self.reuse_prefix_cache:
            first_slot = int(slot_positions.long().argmax(-1).min())
            prefix_cache = model.image_token_prefix_cache(
                input_ids, attention_mask, *pass_inputs(), prefix_length=first_slot
            )
        for k in self.progress_bar(range(rounds)):
            due = torch.zeros_like(known)
            for b in range(batch):
                start = 0 if k == 0 else schedules[b][k - 1]
                due[b, orders[b][start : schedules[b][k]]] = True
            if not bool(due.any()):
                continue
            hidden, drawn_so_far = pass_inputs()
            conditions = model.image_token_conditions(
                input_ids, attention_mask, hidden, drawn_so_far, prefix_cache=prefix_cache
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

    # --- step 3: the pixels ---------------------------------------------------------------------------------------------

    def _decoded(self, tokens, num_tokens, output_type: str) -> SetokimImageGenerationOutput:
        """The drawn `tokens` `(B, L, token_dim)` (n_b real each) decoded by SeTok's detokenizer."""
        pixels = self.model.decode_image_tokens(tokens, num_tokens)
        images = self.processor.image_processor.postprocess(pixels) if output_type == "pil" else pixels
        image_tokens = [row[:n] for row, n in zip(tokens, num_tokens.tolist())]
        self.maybe_free_model_hooks()
        return SetokimImageGenerationOutput(images=images, image_tokens=image_tokens)


def _device_of(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
