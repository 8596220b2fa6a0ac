"""The `setok` command line: `setok demo`, `setok tokenize` and `setok train`.

Multi-GPU runs go through accelerate, which starts this same command once per process:
`accelerate launch --config_file configs/accelerate/ddp.yaml -m transformers_setok.cli train pretrain --config ...`
"""

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "setok-demo/model"


def tokenize(images: list[str], model_path: str, out: str | None, batch_size: int):
    """Print each image's token count and, with `out`, write its cluster overlay there."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModel

    from . import visualize_clusters

    if not Path(model_path).exists() and model_path == DEFAULT_MODEL:
        sys.exit(f"No model at {model_path!r}: run `setok demo` first or pass --model PATH (a saved SeTok).")
    missing = [path for path in images if not Path(path).is_file()]
    if missing:
        sys.exit(f"Image file(s) not found: {', '.join(missing)}")
    if batch_size < 1:
        sys.exit(f"--batch-size must be at least 1, got {batch_size}.")
    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(images), batch_size), desc="tokenizing", unit="batch", disable=len(images) <= 1):
        paths = images[start : start + batch_size]
        loaded = [_open_image(path) for path in paths]
        with torch.inference_mode():
            output = model(processor(loaded, return_tensors="pt")["pixel_values"])
        for i, (path, image) in enumerate(zip(paths, loaded)):
            tqdm.write(f"{path}\t{int(output.num_tokens[i])} tokens")
            if out:
                overlay = visualize_clusters(image, output.cluster_assignment[i])
                overlay.save(Path(out) / f"{Path(path).stem}_clusters.png")


def train(stage: str, config_path: str, resume: str | None):
    """Checks the config, the checkpoint to resume from and the data set, then trains; bad input exits before any
    model is built, with a message naming the key at fault."""
    from .training.config import ConfigError, load_config
    from .training.runners import run_stage

    try:
        config = load_config(config_path, stage)
        metrics = run_stage(config, resume)
    except (ConfigError, FileNotFoundError) as error:
        # Under `accelerate launch` every process finds the same error: one message is enough.
        sys.exit(f"setok train {stage}: {error}" if os.environ.get("RANK", "0") == "0" else 1)

    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"Trained to step {metrics['global_step']}; the model is in {config.final_dir}")
        if "merged_dir" in metrics:
            print(f"Adapters merged into a plain Setokim: {metrics['merged_dir']}")
    return metrics


def _open_image(path: str):
    import PIL.Image

    try:
        return PIL.Image.open(path)
    except (PIL.UnidentifiedImageError, OSError) as error:
        sys.exit(f"Cannot read {path} as an image: {error}")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="setok", description="SeTok, the semantic-equivalent vision tokenizer.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small SeTok on real photos and write a report")
    demo.add_argument("--out", default="setok-demo", help="report folder (default: setok-demo)")
    demo.add_argument("--steps", type=int, default=1000)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--learning-rate", type=float, default=1e-3)
    demo.add_argument("--vision-model", default=None, help="start from this pretrained encoder (hub name or path)")
    demo.add_argument("--seed", type=int, default=0)

    tok = commands.add_parser("tokenize", help="print token counts and write cluster overlays")
    tok.add_argument("images", nargs="+", help="image files")
    tok.add_argument("--model", default=DEFAULT_MODEL, help=f"saved SeTok folder (default: {DEFAULT_MODEL})")
    tok.add_argument("--out", default=None, help="folder for the overlays")
    tok.add_argument("--batch-size", type=int, default=8)

    trainer = commands.add_parser(
        "train",
        help="train a stage from a YAML config (tokenizer: SeTok; pretrain: Setokim's projector; sft: instructions)",
        description="Train one stage from a YAML config (examples in configs/). Runs under `accelerate launch` "
        "for multi-GPU training.",
    )
    trainer.add_argument("stage", choices=["tokenizer", "pretrain", "sft"])
    trainer.add_argument("--config", required=True, help="YAML config of that stage")
    trainer.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="continue from this checkpoint folder, or from the last complete one in output_dir (auto)",
    )

    args = parser.parse_args(argv)
    if args.command == "train":
        # Not returned: the console script passes main()'s value to sys.exit, which would read a dict as a failure.
        train(args.stage, args.config, args.resume)
    elif args.command == "demo":
        from .demo import run_demo

        metrics = run_demo(args.out, args.steps, args.batch_size, args.learning_rate, args.vision_model, args.seed)
        print(
            f"loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}; report: {Path(args.out) / 'report.md'}"
        )
        for name, row in metrics["held_out"].items():
            print(f"  {name}: {row['num_tokens']} tokens, held-out L1 {row['l1_before']:.3f} -> {row['l1_after']:.3f}")
    else:
        tokenize(args.images, args.model, args.out, args.batch_size)


if __name__ == "__main__":
    main()
