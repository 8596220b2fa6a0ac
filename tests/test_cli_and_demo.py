"""The user-facing surface: cluster overlays, `setok tokenize`, a short `setok demo`, the model card."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config

from transformers_setok import SetokImageProcessor, SetokModel, visualize_clusters
from transformers_setok.cli import main
from transformers_setok.hub.model_card import render_setok_card, supported_transformers
from transformers_setok.visualization import cluster_palette


def test_overlay_colours_regions_and_draws_boundaries():
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    labels = np.zeros((4, 4), dtype=np.int64)
    labels[:, 2:] = 1  # left half token 0, right half token 1
    overlay = np.asarray(visualize_clusters(image, labels, alpha=1.0, boundary_color=(0, 0, 0), size=64))
    palette = cluster_palette(2)
    assert overlay.shape == (64, 64, 3)
    assert (overlay[10, 5] == palette[0]).all() and (overlay[10, 60] == palette[1]).all()
    assert (overlay[:, 32] == 0).all(), "the boundary between the halves is drawn"
    assert (overlay[:, 31] != 0).any(axis=-1).all(), "and only there"


def test_overlay_accepts_model_output_and_rejects_bad_maps(photos):
    model = SetokModel(tiny_config()).eval()
    processor = SetokImageProcessor(size=32)
    with torch.no_grad():
        output = model(**processor(photos["astronaut"], return_tensors="pt"))
    overlay = visualize_clusters(photos["astronaut"], output.cluster_assignment[0])
    assert isinstance(overlay, PIL.Image.Image) and overlay.size == (512, 512)
    assert len(np.unique(np.asarray(overlay).reshape(-1, 3), axis=0)) > int(output.num_tokens[0])
    with pytest.raises(ValueError, match="cluster_assignment"):
        visualize_clusters(photos["astronaut"], np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="alpha"):
        visualize_clusters(photos["astronaut"], output.cluster_assignment[0], alpha=2)


@pytest.fixture
def saved_model(tmp_path, photos):
    folder = tmp_path / "setok"
    SetokModel(tiny_config()).save_pretrained(folder)
    SetokImageProcessor(size=32).save_pretrained(folder)
    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        paths.append(tmp_path / f"{name}.png")
        PIL.Image.fromarray(photos[name]).save(paths[-1])
    return folder, paths


def test_tokenize_prints_counts_and_writes_overlays(saved_model, tmp_path, capsys):
    folder, paths = saved_model
    main(
        [
            "tokenize",
            *map(str, paths),
            "--model",
            str(folder),
            "--out",
            str(tmp_path / "overlays"),
            "--batch-size",
            "2",
        ]
    )
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    model, processor = SetokModel.from_pretrained(folder).eval(), SetokImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**processor([PIL.Image.open(p) for p in paths], return_tensors="pt")).num_tokens
    assert [(path, count) for path, count in printed] == [
        (str(path), f"{int(n)} tokens") for path, n in zip(paths, expected)
    ]
    for path in paths:
        assert (tmp_path / "overlays" / f"{path.stem}_clusters.png").is_file()


def test_tokenize_reports_missing_files_and_model(saved_model, tmp_path):
    folder, _ = saved_model
    with pytest.raises(SystemExit, match="not found: .*nope.png"):
        main(["tokenize", str(tmp_path / "nope.png"), "--model", str(folder)])


def test_cli_entry_point_runs_in_a_fresh_process(saved_model):
    folder, paths = saved_model
    result = subprocess.run(
        [sys.executable, "-m", "transformers_setok.cli", "tokenize", str(paths[0]), "--model", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("tokens")


@pytest.mark.slow
def test_short_demo_writes_the_whole_report(tmp_path):
    main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--batch-size", "2"])
    out = tmp_path / "demo"
    for name in ("report.md", "overlays.png", "loss_curve.png", "metrics.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["held_out"]) == {"chelsea", "coffee", "grace_hopper", "flower"}
    assert all(row["num_tokens"] >= 1 for row in metrics["held_out"].values())
    card = (out / "model" / "README.md").read_text()
    assert "SeTok demo" in card and "12 x 12 patches" in card
    reloaded = SetokModel.from_pretrained(out / "model")
    assert reloaded.config.image_size == 96


def test_model_card_is_filled_with_the_config():
    card = render_setok_card(tiny_config(max_num_clusters=16), name="tiny", repo="me/tiny", provenance="Made here.")
    assert "8 x 8 patches of width 32" in card and "width 48" in card and "at most 16 tokens" in card
    assert 'from_pretrained("me/tiny"' in card and "{" not in card.split("```")[0]
    assert f"transformers{supported_transformers()}" in card and supported_transformers().startswith(">=5.23,<")


def test_tokenize_rejects_bad_batch_size_and_non_images(saved_model, tmp_path):
    folder, paths = saved_model
    with pytest.raises(SystemExit, match="--batch-size"):
        main(["tokenize", str(paths[0]), "--model", str(folder), "--batch-size", "0"])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(SystemExit, match="Cannot read .*notes.png"):
        main(["tokenize", str(not_an_image), "--model", str(folder)])
