"""`setok demo`: train a small SeTok on real photos with the Trainer, then tokenize held-out photos and report.

No pretrained SeTok exists (the authors released none), so the demo trains one: a tiny encoder, merger and
detokenizer learn from augmented crops of the photos that ship with scikit-image, scikit-learn and matplotlib. With
`--vision-model NAME` the same command starts from a pretrained encoder (frozen) on a machine that can download it.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..hub.model_card import render_setok_card
from ..modeling import SetokConfig, SetokForImageReconstruction
from ..processing import SetokImageProcessor
from ..processing.image_processing_setok import to_rgb_uint8
from ..visualization import visualize_clusters
from .photos import HELD_OUT_PHOTOS, AugmentedCrops, load_photos

# A SeTok small enough to learn something in a few CPU minutes: 96 x 96 images, 8 x 8 patches (a 12 x 12 grid).
DEMO_CONFIG = dict(
    vision_config=dict(
        model_type="siglip_vision_model",
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=96,
        patch_size=8,
    ),
    freeze_vision_encoder=False,
    cluster_k=16,
    cluster_threshold=0.35,
    cluster_fallback_num_clusters=8,
    max_num_clusters=48,
    merger_hidden_size=96,
    merger_num_attention_heads=4,
    merger_intermediate_size=192,
    merger_num_intra_layers=1,
    merger_num_inter_layers=1,
    token_dim=64,
    detokenizer_hidden_size=128,
    detokenizer_num_attention_heads=4,
    detokenizer_intermediate_size=256,
    detokenizer_num_query_layers=2,
    detokenizer_num_decoder_layers=2,
    reconstruction_loss="l1",
)
# The parts SeTok adds around a pretrained encoder (`--vision-model`), at a size a single GPU trains comfortably.
PRETRAINED_ENCODER_CONFIG = dict(
    merger_hidden_size=1152, merger_num_attention_heads=16, merger_intermediate_size=4304, token_dim=4096
)


def build_model(vision_model: str | None):
    """The demo's model and processor: tiny and from scratch, or around a pretrained encoder by name."""
    if vision_model is None:
        config = SetokConfig(**DEMO_CONFIG)
        size = config.image_size
        return SetokForImageReconstruction(config), SetokImageProcessor(size={"height": size, "width": size})
    model = SetokForImageReconstruction.from_pretrained_encoders(vision_model, **PRETRAINED_ENCODER_CONFIG)
    return model, SetokImageProcessor.from_encoder(vision_model, model.config.image_size)


class LossHistory(TrainerCallback):
    """Keeps `(step, loss)` of every logged step for the loss curve."""

    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


@torch.no_grad()
def tokenize_held_out(model, processor, photos: dict[str, np.ndarray]):
    model.eval()
    pixel_values = processor(list(photos.values()), return_tensors="pt")["pixel_values"].to(model.device)
    output = model(pixel_values)
    target = model.reconstruction_target(pixel_values)
    per_image_l1 = (output.reconstruction - target).abs().flatten(1).mean(-1)
    return output, per_image_l1


def to_display(pixels: torch.Tensor, processor) -> PIL.Image.Image:
    """Undo the processor's normalisation: `(3, H, W)` -> RGB image."""
    return processor.postprocess(pixels)[0]


def save_figures(out: Path, photos, output, processor, history, size: int = 256):
    """overlays.png (photo | clusters | reconstruction per held-out photo) and loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(photos), 3, figsize=(9, 3 * len(photos)))
    for row, (name, photo) in enumerate(photos.items()):
        count = int(output.num_tokens[row])
        panels = [
            (PIL.Image.fromarray(to_rgb_uint8(photo)).resize((size, size)), name),
            (visualize_clusters(photo, output.cluster_assignment[row], size=size), f"{count} SeTok tokens"),
            (to_display(output.reconstruction[row], processor).resize((size, size)), "reconstruction"),
        ]
        for axis, (panel, title) in zip(axes[row], panels):
            axis.imshow(panel)
            axis.set_title(title)
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(out / "overlays.png", dpi=80)
    plt.close(figure)

    steps, losses = zip(*history)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (L1, normalised pixels)")
    axis.set_title("SeTok demo: reconstruction loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "loss_curve.png", dpi=100)
    plt.close(figure)


def write_report(out: Path, metrics: dict):
    lines = [
        "# SeTok demo report",
        "",
        f"Trained {metrics['steps']} steps (batch {metrics['batch_size']}) on augmented crops of "
        f"{len(metrics['train_photos'])} photos in {metrics['train_seconds']:.0f} s.",
        "",
        f"Training loss: {metrics['first_loss']:.4f} (first logged) -> {metrics['last_loss']:.4f} (last logged).",
        "",
        "| held-out photo | SeTok tokens | L1 before training | L1 after training |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in metrics["held_out"].items():
        lines.append(f"| {name} | {row['num_tokens']} | {row['l1_before']:.4f} | {row['l1_after']:.4f} |")
    lines += ["", "![clusters](overlays.png)", "", "![loss](loss_curve.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def run_demo(
    out: str = "setok-demo",
    steps: int = 1000,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    vision_model: str | None = None,
    seed: int = 0,
) -> dict:
    """Train, tokenize the held-out photos, write the report into `out`; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, processor = build_model(vision_model)
    photos = load_photos()
    held_out = {name: photos[name] for name in HELD_OUT_PHOTOS}
    train = {name: image for name, image in photos.items() if name not in held_out}
    _, l1_before = tokenize_held_out(model, processor, held_out)

    history = LossHistory()
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, math.ceil(0.03 * steps)),
        weight_decay=0.01,
        logging_steps=max(1, min(10, steps // 10)),
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    dataset = AugmentedCrops(list(train.values()), processor, length=steps * batch_size, seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[history])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    output, l1_after = tokenize_held_out(model, processor, held_out)
    save_figures(out, held_out, output, processor, history.losses)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    metrics = {
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": train_seconds,
        "train_photos": sorted(train),
        "first_loss": history.losses[0][1],
        "last_loss": history.losses[-1][1],
        "loss_history": history.losses,
        "held_out": {
            name: {
                "num_tokens": int(output.num_tokens[i]),
                "l1_before": float(l1_before[i]),
                "l1_after": float(l1_after[i]),
            }
            for i, name in enumerate(held_out)
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, metrics)
    write_model_card(out / "model", model.config, steps, len(train))
    return metrics


def write_model_card(folder: Path, config, steps: int, num_photos: int):
    provenance = (
        f"Trained by `setok demo` for {steps} steps on augmented crops of {num_photos} photos that ship with "
        "scikit-image, scikit-learn and matplotlib: a demonstration model, not a production tokenizer."
    )
    try:
        card = render_setok_card(config, name="SeTok demo", repo=str(folder), provenance=provenance)
    except FileNotFoundError as error:  # installed from a wheel: the templates live in the source checkout
        print(f"No model card written: {error}")
        return
    (folder / "README.md").write_text(card)
