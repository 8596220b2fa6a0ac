"""The user-facing surface: cluster overlays, `setok tokenize`, a short `setok demo`, the model card."""

import json
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config

from transformers_setok import SetokImageProcessor, SetokModel, visualize_clusters
from transformers_setok.cli import main, overlay_names
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
    overlays = [tmp_path / "overlays" / f"{path.stem}_clusters.png" for path in paths]
    assert printed == [[str(path), f"{int(n)} tokens", str(o)] for path, n, o in zip(paths, expected, overlays)]
    assert all(overlay.is_file() for overlay in overlays)
    index = json.loads((tmp_path / "overlays" / "index.json").read_text())
    assert index == {
        "model": str(folder),
        "images": [
            {"image": str(p), "overlay": o.name, "num_tokens": int(n)} for p, o, n in zip(paths, overlays, expected)
        ],
        "skipped": [],
    }


def test_tokenize_never_overwrites_an_overlay_with_another(saved_model, tmp_path, capsys):
    """a/x.jpg and b/x.png used to write one x_clusters.png, the second over the first."""
    folder, paths = saved_model
    for sub, suffix, source in (("a", ".jpg", paths[0]), ("b", ".png", paths[1])):
        (tmp_path / sub).mkdir()
        PIL.Image.open(source).convert("RGB").save(tmp_path / sub / f"x{suffix}")
    images = [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.png")]
    main(["tokenize", *images, "--model", str(folder), "--out", str(tmp_path / "out")])
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [(image, overlay) for image, _, overlay in printed] == [
        (images[0], str(tmp_path / "out" / "a_x_clusters.png")),
        (images[1], str(tmp_path / "out" / "b_x_clusters.png")),
    ]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [(row["image"], row["overlay"]) for row in index["images"]] == [
        (images[0], "a_x_clusters.png"),
        (images[1], "b_x_clusters.png"),
    ]
    a, b = (np.asarray(PIL.Image.open(tmp_path / "out" / name)) for name in ("a_x_clusters.png", "b_x_clusters.png"))
    assert not np.array_equal(a, b), "two overlays of two images"


@pytest.mark.parametrize(
    "paths, names",
    [
        (["p/a.png", "p/b.png"], ["a", "b"]),
        (["a/x.jpg", "b/x.png"], ["a_x", "b_x"]),
        (["c/a/x.png", "d/a/x.png", "d/b/y.png"], ["c_a_x", "d_a_x", "y"]),
        (["a/x.jpg", "a/x.png"], ["x_jpg", "x_png"]),
        (["a/x.png", "a/x.png", "./a/x.png"], ["x", "x-2", "x-3"]),
        (["a/x.png", "b/X.png"], ["a_x", "b_X"]),
        (["a/X.png", "A/x.png"], ["a_X", "A_x-2"]),  # the same name to a case-insensitive file system
        (["a/x.png", "b/x.png", "a_x.png"], ["a_x", "b_x", "a_x-2"]),
    ],
)
def test_overlay_names_are_distinct(paths, names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert overlay_names(paths) == [f"{name}_clusters.png" for name in names]


def test_tokenize_takes_the_images_of_a_folder(saved_model, tmp_path, capsys):
    """A folder used to be reported as "Image file(s) not found"."""
    folder, paths = saved_model
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for target, source in (
        (photos / "b.png", paths[0]),
        (photos / "a.JPG", paths[1]),
        (photos / "more" / "c.png", paths[2]),
    ):
        PIL.Image.open(source).convert("RGB").save(target, format="PNG" if target.suffix == ".png" else "JPEG")
    (photos / "notes.txt").write_text("not an image")
    (photos / ".hidden.png").write_text("editor droppings")
    main(["tokenize", str(photos), "--model", str(folder)])
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [
        str(photos / "a.JPG"),
        str(photos / "b.png"),
    ]
    out = photos / "overlays"  # an earlier run's overlays inside the folder are no input
    out.mkdir()
    PIL.Image.open(paths[0]).save(out / "old_clusters.png")
    main(["tokenize", str(photos), "--recursive", "--model", str(folder), "--out", str(out)])
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [
        str(photos / "a.JPG"),
        str(photos / "b.png"),
        str(photos / "more" / "c.png"),
    ]


def test_tokenize_skip_bad_skips_unreadable_images_and_counts_them(saved_model, tmp_path, capsys):
    """A truncated JPEG used to stop the whole batch with a bare `OSError: image file is truncated`."""
    folder, paths = saved_model
    PIL.Image.open(paths[0]).convert("RGB").save(tmp_path / "full.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:2000])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    images = [str(paths[0]), str(truncated), str(paths[1]), str(not_an_image), str(paths[2])]
    argv = ["tokenize", *images, "--model", str(folder), "--batch-size", "2", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"Cannot read .*truncated\.jpg as an image: .*[Tt]runcated"):
        main(argv)
    capsys.readouterr()
    main([*argv, "--skip-bad"])
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [str(p) for p in paths]
    assert re.search(r"Skipped 2 of 5 images: .*truncated\.jpg \(.*[Tt]runcated.*\), .*notes\.png", captured.err)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [row["image"] for row in index["skipped"]] == [str(truncated), str(not_an_image)]
    assert len(index["images"]) == 3


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
