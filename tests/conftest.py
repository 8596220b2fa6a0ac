"""Shared fixtures: tiny SeTok configs built locally (no hub access) and real photos that ship with scikit-image."""

import numpy as np
import pytest
import torch
from transformers import logging

from transformers_setok import SetokConfig

logging.set_verbosity_error()


# Building blocks of `tiny_config`, also used on their own (e.g. for `from_pretrained_encoders`).
TINY_VISION_KWARGS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
)
TINY_SETOK_KWARGS = dict(
    merger_hidden_size=32,
    merger_num_attention_heads=4,
    merger_intermediate_size=64,
    token_dim=48,
    detokenizer_hidden_size=32,
    detokenizer_num_attention_heads=4,
    detokenizer_intermediate_size=64,
    detokenizer_num_query_layers=1,
    detokenizer_num_decoder_layers=1,
    cluster_k=8,
    cluster_threshold=0.4,  # gives 5-26 tokens per photo with the seed-0 random encoder
    cluster_fallback_num_clusters=8,
)
TINY_TEXT_CONFIG = dict(
    model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100
)


# The training arguments of two-step CPU runs that log every step and keep no checkpoints unless told to; also the
# `training` section of the tiny YAML configs (tests/test_train_cli.py).
TINY_TRAINING_KWARGS = dict(
    per_device_train_batch_size=2,
    max_steps=2,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    remove_unused_columns=False,
    dataloader_pin_memory=False,
    use_cpu=True,
    seed=0,
)


def tiny_training_arguments(output_dir, factory=None, **overrides):
    """`TrainingArguments` (or what `factory` builds from the same keywords: `setokim_sft_config`, a
    TrainingArguments subclass) for two-step CPU runs, `TINY_TRAINING_KWARGS` with `overrides` on top."""
    from transformers import TrainingArguments

    return (factory or TrainingArguments)(output_dir=str(output_dir), **{**TINY_TRAINING_KWARGS, **overrides})


def assert_accumulation_matches_one_batch(first_step):
    """`first_step(**training_overrides)` -> the first training log: one batch of 2 and 2 accumulated batches of 1 must
    log the same loss and gradient norm."""
    whole = first_step(per_device_train_batch_size=2)
    accumulated = first_step(per_device_train_batch_size=1, gradient_accumulation_steps=2)
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-4)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)


def user(*parts):
    """A user chat message: `None` parts are images, strings are text."""
    return {
        "role": "user",
        "content": [{"type": "image"} if part is None else {"type": "text", "text": part} for part in parts],
    }


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def tiny_config(**overrides) -> SetokConfig:
    """A SeTok small enough to run in milliseconds: 32 x 32 images, 4 x 4 patches -> an 8 x 8 grid of width 32."""
    kwargs = dict(vision_config=dict(model_type="siglip_vision_model", **TINY_VISION_KWARGS), **TINY_SETOK_KWARGS)
    kwargs.update(overrides)
    return SetokConfig(**kwargs)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, which cost 10-20x on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def photos():
    """Real photos (RGB uint8) from scikit-image."""
    from skimage import data

    return {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
