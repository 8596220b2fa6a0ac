"""Shared fixtures: tiny SeTok configs built locally (no hub access) and real photos that ship with scikit-image."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, logging

from transformers_setok import (
    SetokConfig,
    SetokImageProcessor,
    SetokimConfig,
    SetokimForConditionalGeneration,
    SetokimProcessor,
)

logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------------------------------
# Tiny tokenizers, processors and Setokims shared by the test modules


CHAT_WORDS = [
    "<unk>",
    "<pad>",
    "</s>",
    "<s>",
    "User",
    "Assistant",
    ":",
    "what",
    "is",
    "in",
    "the",
    "image",
    "?",
    "a",
    "cat",
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built locally: words, punctuation and the image markers are tokens."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\[/?Img\]|<image>|[:?]"), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def tiny_processor() -> SetokimProcessor:
    return SetokimProcessor(image_processor=SetokImageProcessor(size=32), tokenizer=word_tokenizer())


def tiny_setokim(
    processor: SetokimProcessor,
    use_generation_head: bool = False,
    use_mask_decoder: bool = False,
    vision_config: SetokConfig | None = None,
    **text_overrides,
) -> SetokimForConditionalGeneration:
    """A tiny Llama-based Setokim whose vocabulary and special ids match `processor` (with a tiny generation head
    and a tiny mask decoder when asked), around `vision_config` (default `tiny_config()`)."""
    text = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(processor.tokenizer),
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    text.update(text_overrides)
    config = SetokimConfig(
        vision_config=vision_config or tiny_config(),
        text_config=text,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
        use_generation_head=use_generation_head,
        generation_head_width=48,
        generation_head_depth=2,
        **(TINY_MASK_DECODER if use_mask_decoder else {}),
    )
    return SetokimForConditionalGeneration(config).eval()


TINY_MASK_DECODER = dict(
    use_mask_decoder=True, mask_decoder_width=32, mask_decoder_depth=2, mask_decoder_heads=4,
    mask_decoder_intermediate_size=64,
)  # fmt: skip


IMAGE, BOI, EOI, PAD = 67, 68, 69, 0
TEXT_CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=16),
}


def setokim_config(backbone: str = "llama", **text_overrides) -> SetokimConfig:
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=70)
    text.update(TEXT_CONFIGS[backbone], pad_token_id=PAD, **text_overrides)
    return SetokimConfig(
        vision_config=tiny_config(), text_config=text, image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI
    )


def image_block(count: int) -> list[int]:
    return [BOI] + [IMAGE] * count + [EOI]


def counts_of(model, pixels) -> list[int]:
    return [len(features) for features in model.get_image_features(pixels).pooler_output]


def trainer_for(model, processor, records, tmp_path, **kwargs):
    """A stage-2 `SetokimPretrainTrainer` on `records`; keyword arguments of its own go to it, the rest to
    `tiny_training_arguments`."""
    import inspect

    from transformers_setok.training.collators import SetokimChatCollator
    from transformers_setok.training.setokim_trainer import SetokimPretrainTrainer

    trainer_options = set(inspect.signature(SetokimPretrainTrainer.__init__).parameters) - {
        "self",
        "model",
        "args",
        "kwargs",
    }
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in trainer_options}
    args = tiny_training_arguments(tmp_path, **{"learning_rate": 1e-2, "weight_decay": 0.1, **kwargs})
    return SetokimPretrainTrainer(
        model=model.train(),
        args=args,
        train_dataset=records,
        data_collator=SetokimChatCollator(processor),
        processing_class=processor,
        **options,
    )


CONCEPT_WORDS = ["[UNK]", "[PAD]", "a", "photo", "of", "cat", "cup", "rocket", "man"]


def text_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the concept phrases (the stage-1 text encoder's)."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(CONCEPT_WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def count_setok_calls(model, monkeypatch) -> list[int]:
    """A list that records the batch size of every forward of `model`'s SeTok from now on."""
    calls = []
    forward = model.model.vision_tower.forward
    monkeypatch.setattr(
        model.model.vision_tower,
        "forward",
        lambda pixels, *a, **k: calls.append(len(pixels)) or forward(pixels, *a, **k),
    )
    return calls


# Defaults for the modules that use one tiny Setokim throughout (others define their own `processor` and `model`).
@pytest.fixture(scope="module")
def processor():
    """A module's tiny SetokimProcessor (its word tokenizer and a 32-pixel image processor)."""
    return tiny_processor()


@pytest.fixture(scope="module")
def model(processor):
    """A module's tiny Setokim matching `processor`, seeded."""
    torch.manual_seed(0)
    return tiny_setokim(processor)


# --------------------------------------------------------------------------------------------------------------------
# Subprocesses: two CPU processes under `accelerate launch`, and a Python without this package


def accelerate_launch(script: Path, script_args: list[str], workdir: Path, config: str | None = None, **extra_env):
    """`script` under `accelerate launch` with two CPU processes (gloo): DDP, or the shipped accelerate `config`
    (configs/accelerate/) as shipped but for `num_processes: 2`. Returns the finished process (not checked)."""
    import subprocess
    import sys

    import yaml

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(workdir / "hf_home"), **extra_env)
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is None:
        # `--multi_gpu` is accelerate's torchrun launcher; ACCELERATE_USE_CPU keeps the processes on the CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        command += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    else:
        # Not `use_cpu: true` / ACCELERATE_USE_CPU: accelerate would then silently run plain DDP (MULTI_CPU) instead
        # of DeepSpeed, which finds no GPU and runs on its CPU accelerator (gloo) by itself.
        env.pop("ACCELERATE_USE_CPU", None)
        settings = yaml.safe_load((REPO / "configs" / "accelerate" / config).read_text())
        settings.update(num_processes=2)
        (workdir / "accelerate.yaml").write_text(yaml.safe_dump(settings))
        command += ["--config_file", str(workdir / "accelerate.yaml")]
    command += ["--dynamo_backend", "no", "--main_process_port", "0", str(script), *script_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


# The first lines of a child Python that must run without this package (remote code): importing it fails there.
WITHOUT_THE_PACKAGE = r"""
import importlib.abc
import sys


class HideSetok(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers_setok" or name.startswith("transformers_setok."):
            raise ImportError(f"{name} is hidden in this test")
        return None


sys.meta_path.insert(0, HideSetok())
"""


@pytest.fixture
def trainers(monkeypatch) -> list:
    """Each trainer `setok train` builds, from now on (the stage runners' `_train_and_save`, recorded)."""
    from transformers_setok.training import runners

    built = []
    train_and_save = runners._train_and_save

    def recording(trainer, *args, **kwargs):
        built.append(trainer)
        return train_and_save(trainer, *args, **kwargs)

    monkeypatch.setattr(runners, "_train_and_save", recording)
    return built
