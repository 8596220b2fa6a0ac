"""The `setok` command line: `setok demo` and `setok tokenize`."""

import argparse
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

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .training.demo import run_demo

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
