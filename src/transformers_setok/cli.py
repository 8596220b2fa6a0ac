"""The `setok` command line: `setok demo`, `setok tokenize`, `setok segment`, `setok edit` and `setok train`.

Multi-GPU runs go through accelerate, which starts this same command once per process:
`accelerate launch --config_file configs/accelerate/ddp.yaml -m transformers_setok.cli train pretrain --config ...`

Bad input (a missing or unreadable file, a bad config, a bad argument) ends the command with one line naming the file
or argument and a non-zero exit status; `setok --debug ...` shows the traceback instead.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from .loading import check_model_path, load_pretrained

DEFAULT_MODEL = "setok-demo/model"
# What a user's input can make go wrong: ConfigError, DataValidationError (both ValueErrors), FileNotFoundError,
# PermissionError, IsADirectoryError... (OSErrors). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
# The files a folder given to `setok tokenize` contributes (case-insensitive); a file named on its own may be any.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INDEX_FILE = "index.json"  # in --out: which overlay belongs to which image
SHOWN_SKIPPED = 3  # unreadable images named in the skip summary; the count covers them all


def tokenize(
    images: list[str],
    model_path: str,
    out: str | None = None,
    batch_size: int = 8,
    recursive: bool = False,
    skip_bad: bool = False,
):
    """Print each image's token count and, with `out`, write its cluster overlay there (names in `out/index.json`).

    `images` are files or folders (their images; with `recursive`, their subfolders' too). An unreadable image is
    an error naming it, or with `skip_bad` left out and counted at the end. Bad input raises ValueError or OSError.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModel

    from . import visualize_clusters

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    paths = find_images(images, recursive, leave_out=out)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, not a folder for the overlays.")
    if model_path == DEFAULT_MODEL and not Path(model_path).exists():
        raise FileNotFoundError(
            f"No model at {model_path!r}: run `setok demo` first or pass --model PATH (a saved SeTok)."
        )
    model = load_pretrained(AutoModel, model_path, required=("preprocessor_config.json",)).eval()
    processor = load_pretrained(AutoImageProcessor, model_path)
    names = overlay_names(paths) if out is not None else None
    if out is not None:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"--out {out}: cannot create the folder: {error}") from error

    written, skipped = [], []
    with tqdm(total=len(paths), desc="tokenizing", unit="image", disable=len(paths) <= 1) as progress:
        for batch in _batches(paths, processor, batch_size, skip_bad, skipped, progress):
            with torch.inference_mode():
                output = model(torch.cat([pixel_values for _, _, pixel_values in batch]))
            for i, (index, image, _) in enumerate(batch):
                line = f"{paths[index]}\t{int(output.num_tokens[i])} tokens"
                if names is not None:
                    overlay = Path(out) / names[index]
                    visualize_clusters(image, output.cluster_assignment[i]).save(overlay)
                    written.append(
                        {"image": paths[index], "overlay": names[index], "num_tokens": int(output.num_tokens[i])}
                    )
                    line += f"\t{overlay}"
                tqdm.write(line)
            progress.update(len(batch))

    if out is not None:
        index = {"model": model_path, "images": written, "skipped": [{"image": p, "error": e} for p, e in skipped]}
        (Path(out) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if skipped:
        shown = ", ".join(f"{path} ({error})" for path, error in skipped[:SHOWN_SKIPPED])
        more = f" and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
        listed = f" (all listed in {Path(out) / INDEX_FILE})" if out is not None and more else ""
        summary = f"{len(skipped)} of {len(paths)} images: {shown}{more}{listed}"
        if len(skipped) == len(paths):
            raise ValueError(f"All {summary} are unreadable.")
        print(f"Skipped {summary}.", file=sys.stderr)


def segment(
    images: list[str],
    expression: str,
    model_path: str,
    out: str,
    recursive: bool = False,
    skip_bad: bool = False,
):
    """Segment what `expression` refers to in each image with a Setokim that has a mask decoder; write
    `<stem>_mask.png` (255 on the object) and `<stem>_overlay.png` into `out`, listed in `out/index.json` with each
    mask's predicted IoU and the text the model wrote. Bad input raises ValueError or OSError."""
    import numpy as np
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import visualize_masks
    from .pipelines import SetokimReferringSegmentationPipeline

    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("--expression must be a non-empty text: what to segment.")
    paths = find_images(images, recursive, leave_out=out)
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, not a folder for the masks.")
    model = load_pretrained(AutoModelForImageTextToText, model_path, required=("config.json",)).eval()
    if not getattr(model.config, "use_mask_decoder", False):
        raise ValueError(
            f"--model {model_path}: this Setokim has no mask decoder (config `use_mask_decoder`); train one with "
            "referring-segmentation data."
        )
    segmenter = SetokimReferringSegmentationPipeline(model=model, processor=load_pretrained(AutoProcessor, model_path))
    run = ImageRun(paths, out, skip_bad, suffix="_mask.png")
    for path, stem, image in run.images("segmenting"):
        result = segmenter(image, expression=expression)
        result["mask"].save(Path(out) / f"{stem}_mask.png")
        visualize_masks(image, np.asarray(result["mask"]) > 0).save(Path(out) / f"{stem}_overlay.png")
        entry = {"image": path, "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"}
        run.wrote({**entry, "score": result["score"], "text": result["text"]}, f"IoU {result['score']:.3f}")
    return run.finish({"model": model_path, "expression": expression})


def edit(
    images: list[str],
    instruction: str,
    model_path: str,
    out: str,
    guidance_scale: float = 1.0,
    image_guidance_scale: float = 1.0,
    steps: int | None = None,
    seed: int = 0,
    recursive: bool = False,
    skip_bad: bool = False,
):
    """Edit each image as `instruction` says with a Setokim that has a generation head; write `<stem>_edited.png`
    (at the model's resolution) into `out`, listed in `out/index.json` with each edit's token count. Each image is
    drawn with its own generator seeded with `seed`, so an edit does not depend on the other images of the run. Bad
    input raises ValueError or OSError."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .generation import check_guidance_scale, noise_scheduler_for
    from .pipelines import SetokimImageEditingPipeline

    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("--instruction must be a non-empty text: what to change in the images.")
    check_guidance_scale(guidance_scale, "--guidance-scale")
    check_guidance_scale(image_guidance_scale, "--image-guidance-scale")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}.")
    paths = find_images(images, recursive, leave_out=out)
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, not a folder for the edited images.")
    model = load_pretrained(AutoModelForImageTextToText, model_path, required=("config.json",)).eval()
    if not getattr(model.config, "use_generation_head", False):
        raise ValueError(
            f"--model {model_path}: this Setokim has no generation head (config `use_generation_head`), so it cannot "
            "draw an edited image; add one with `transformers_setok.add_generation_head` and train it on edits."
        )
    editor = SetokimImageEditingPipeline(
        model=model, processor=load_pretrained(AutoProcessor, model_path), scheduler=noise_scheduler_for(model.config)
    )
    editor.set_progress_bar_config(disable=True)
    run = ImageRun(paths, out, skip_bad, suffix="_edited.png")
    for path, stem, image in run.images("editing"):
        result = editor(
            image=image,
            prompt=instruction,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
        )
        result.images[0].save(Path(out) / f"{stem}_edited.png")
        tokens = len(result.image_tokens[0])
        run.wrote({"image": path, "edited": f"{stem}_edited.png", "num_tokens": tokens}, f"{tokens} tokens")
    settings = dict(guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, steps=steps, seed=seed)
    return run.finish({"model": model_path, "instruction": instruction, **settings})


class ImageRun:
    """One image command's pass over `paths` into the folder `out` (`segment`, `edit`): the folder made, each image
    opened (an unreadable one named, or with `skip_bad` left out and counted), a progress bar, and `out/index.json`
    listing what was written and skipped. Output names are `<stem><suffix>` (see `overlay_names`)."""

    def __init__(self, paths: list[str], out: str, skip_bad: bool, suffix: str):
        self.paths, self.out, self.skip_bad = paths, Path(out), skip_bad
        self.stems = [name.removesuffix(suffix) for name in overlay_names(paths, suffix=suffix)]
        self.written, self.skipped = [], []
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"--out {out}: cannot create the folder: {error}") from error

    def images(self, verb: str):
        """(path, output stem, RGB image) of each readable image, under a progress bar."""
        from tqdm.auto import tqdm

        for path, stem in tqdm(
            list(zip(self.paths, self.stems)), desc=verb, unit="image", disable=len(self.paths) <= 1
        ):
            try:
                image = _open_image(path).convert("RGB")
            except ValueError as error:
                if not self.skip_bad:
                    raise ValueError(
                        f"Cannot read {path} as an image: {error}; --skip-bad skips such files."
                    ) from error
                self.skipped.append((path, str(error)))
                continue
            yield path, stem, image

    def wrote(self, entry: dict, summary: str):
        """Records `entry` (its `image` and what was written for it) and prints one line for it."""
        from tqdm.auto import tqdm

        self.written.append(entry)
        tqdm.write(f"{entry['image']}\t{summary}")

    def finish(self, settings: dict) -> list[dict]:
        """Writes `out/index.json` (`settings`, then the images written and skipped); returns the written entries."""
        skipped = [{"image": path, "error": error} for path, error in self.skipped]
        index = {**settings, "images": self.written, "skipped": skipped}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if skipped:
            print(f"Skipped {len(skipped)} unreadable image(s), listed in {self.out / INDEX_FILE}.", file=sys.stderr)
        return self.written


def find_images(arguments: list[str], recursive: bool = False, leave_out: str | None = None) -> list[str]:
    """The image files `arguments` name: files as given, folders by their images (IMAGE_SUFFIXES, sorted; their
    subfolders' too with `recursive`, except those in `leave_out`, the overlay folder of an earlier run). Raises
    FileNotFoundError for what does not exist or a folder without images."""
    found, missing = [], []
    skip = Path(leave_out).resolve() if leave_out is not None else None
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            inside = sorted(
                file
                for file in (path.rglob("*") if recursive else path.iterdir())
                if file.suffix.lower() in IMAGE_SUFFIXES
                and not file.name.startswith(".")
                and file.is_file()
                and (skip is None or not file.resolve().is_relative_to(skip))
            )
            if not inside:
                deeper = not recursive and any(child.is_dir() for child in path.iterdir())
                hint = "; --recursive also takes its subfolders' images" if deeper else ""
                raise FileNotFoundError(
                    f"{argument} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)}){hint}."
                )
            found.extend(map(str, inside))
        elif path.exists():
            found.append(argument)
        else:
            missing.append(argument)
    if missing:
        raise FileNotFoundError(f"Image file(s) not found: {', '.join(missing)}")
    return found


def overlay_names(paths: list[str], suffix: str = "_clusters.png") -> list[str]:
    """A distinct overlay file name per image of `paths`, in order: `<stem><suffix>`. Where stems clash
    (a/x.jpg, b/x.png) the fewest parent folders that tell the images apart come first (a_x, b_x); in the same
    folder the extension follows (x_jpg, x_png); what still clashes (one file named twice) gets -2, -3, ...
    Names are compared case-insensitively, as some file systems do."""
    files = [Path(path).resolve() for path in paths]
    by_stem: dict[str, list[int]] = {}
    for i, file in enumerate(files):
        by_stem.setdefault(file.stem.casefold(), []).append(i)
    labels = []
    for file in files:
        rivals = [files[j] for j in by_stem[file.stem.casefold()] if files[j] != file]
        label = file.stem
        elsewhere = [rival.parent for rival in rivals if rival.parent != file.parent]
        if elsewhere:
            label = f"{_folder_label(file.parent, elsewhere)}_{label}"
        if any(rival.parent == file.parent for rival in rivals):
            label = f"{label}_{file.suffix.lstrip('.')}"
        labels.append(label)
    names, taken = [], set()
    for label in labels:
        name, count = label, 1
        while name.casefold() in taken:
            count += 1
            name = f"{label}-{count}"
        taken.add(name.casefold())
        names.append(f"{name}{suffix}")
    return names


def _folder_label(folder: Path, others: list[Path]) -> str:
    """The fewest trailing folder names of `folder` that none of `others` ends with, joined by "_"."""
    parts = folder.relative_to(folder.anchor).parts
    for depth in range(1, len(parts) + 1):
        tail = parts[-depth:]
        if all(other.relative_to(other.anchor).parts[-depth:] != tail for other in others):
            return "_".join(tail)
    return "_".join(parts) or "root"


def _batches(paths, processor, batch_size, skip_bad, skipped, progress):
    """Batches of (index in `paths`, image, pixel_values) of up to `batch_size` readable images. An unreadable one
    raises ValueError naming it, or with `skip_bad` is appended to `skipped` as (path, reason)."""
    batch = []
    for index, path in enumerate(paths):
        try:
            image = _open_image(path)
            try:
                pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            except (ValueError, OSError) as error:
                raise ValueError(f"cannot be processed: {error}") from error
        except ValueError as error:
            if not skip_bad:
                raise ValueError(f"Cannot read {path} as an image: {error}; --skip-bad skips such files.") from error
            skipped.append((path, str(error)))
            progress.update(1)
            continue
        batch.append((index, image, pixel_values))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _open_image(path: str):
    """The image at `path`, decoded now (PIL decodes lazily, so a truncated file would fail later, unnamed)."""
    import PIL.Image

    try:
        image = PIL.Image.open(path)
        image.load()
    # SyntaxError: some PIL plugins raise it for a corrupt file; DecompressionBombError: an implausibly large one.
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(" ".join(str(error).split()) or type(error).__name__) from error
    return image


def train(stage: str, config_path: str, resume: str | None = None, overwrite: bool = False):
    """Checks the config, the checkpoint to resume from and the data set, then trains; bad input raises (ConfigError,
    FileNotFoundError) before any model is built, with a message naming the key at fault."""
    from .training.config import load_config
    from .training.runners import end_process_group, run_stage

    config = load_config(config_path, stage)
    metrics = run_stage(config, resume, overwrite=overwrite)

    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"Trained to step {metrics['global_step']}; the model is in {config.final_dir}")
        if "merged_dir" in metrics:
            print(f"Adapters merged into a plain Setokim: {metrics['merged_dir']}")
    end_process_group()  # the command's processes end here, under `accelerate launch` too
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="setok", description="SeTok, the semantic-equivalent vision tokenizer.")
    debug = dict(action="store_true", help="show the Python traceback of an error instead of a one-line message")
    parser.add_argument("--debug", **debug)
    # Also accepted after the command (`setok tokenize ... --debug`); SUPPRESS keeps the subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", **{**debug, "default": argparse.SUPPRESS})
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", parents=[common], help="train a small SeTok on real photos and write a report")
    demo.add_argument("--out", default="setok-demo", help="report folder (default: setok-demo)")
    demo.add_argument("--steps", type=int, default=1000)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--learning-rate", type=float, default=1e-3)
    demo.add_argument("--vision-model", default=None, help="start from this pretrained encoder (hub name or path)")
    demo.add_argument("--seed", type=int, default=0)

    tok = commands.add_parser(
        "tokenize",
        parents=[common],
        help="print token counts and write cluster overlays",
        description="Print each image's token count; with --out, write its cluster overlay there. Overlays are "
        f"named <stem>_clusters.png (parent folders added where stems clash); --out/{INDEX_FILE} maps them to "
        "the images.",
    )
    tok.add_argument("images", nargs="+", help="image files, or folders of images")
    tok.add_argument("--model", default=DEFAULT_MODEL, help=f"saved SeTok folder or Hub id (default: {DEFAULT_MODEL})")
    tok.add_argument("--out", default=None, help=f"folder for the overlays and {INDEX_FILE}")
    tok.add_argument("--batch-size", type=int, default=8)
    tok.add_argument("--recursive", action="store_true", help="take the images in the folders' subfolders too")
    tok.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (counted at the end) instead of stopping"
    )

    seg = commands.add_parser(
        "segment",
        parents=[common],
        help="segment what an expression refers to in images (a Setokim with a mask decoder)",
        description=f"Write each image's mask (<stem>_mask.png) and overlay (<stem>_overlay.png) into --out; "
        f"--out/{INDEX_FILE} lists them with the predicted IoU and the text the model wrote.",
    )
    seg.add_argument("images", nargs="+", help="image files, or folders of images")
    seg.add_argument("--expression", required=True, help='what to segment, e.g. "the bag on the left"')
    seg.add_argument("--model", required=True, help="saved Setokim folder (with a mask decoder) or Hub id")
    seg.add_argument("--out", required=True, help=f"folder for the masks, overlays and {INDEX_FILE}")
    seg.add_argument("--recursive", action="store_true", help="take the images in the folders' subfolders too")
    seg.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")

    ed = commands.add_parser(
        "edit",
        parents=[common],
        help="edit images as an instruction says (a Setokim with a generation head)",
        description=f"Write each image's edit (<stem>_edited.png, at the model's resolution) into --out; "
        f"--out/{INDEX_FILE} lists them with their token counts.",
    )
    ed.add_argument("images", nargs="+", help="image files, or folders of images")
    ed.add_argument("--instruction", required=True, help='what to change, e.g. "replace the bag with a sneaker"')
    ed.add_argument("--model", required=True, help="saved Setokim folder (with a generation head) or Hub id")
    ed.add_argument("--out", required=True, help=f"folder for the edited images and {INDEX_FILE}")
    ed.add_argument("--guidance-scale", type=float, default=1.0, help="text guidance scale (default 1: none)")
    ed.add_argument("--image-guidance-scale", type=float, default=1.0, help="image guidance scale (default 1: none)")
    ed.add_argument("--steps", type=int, default=None, help="denoising steps per token (default: the model's)")
    ed.add_argument("--seed", type=int, default=0, help="seed of each image's generator (default 0)")
    ed.add_argument("--recursive", action="store_true", help="take the images in the folders' subfolders too")
    ed.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")

    trainer = commands.add_parser(
        "train",
        parents=[common],
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
    trainer.add_argument(
        "--overwrite", action="store_true", help="start afresh even though output_dir already holds a run"
    )
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        command = f"setok {args.command}" + (f" {args.stage}" if args.command == "train" else "")
        message = " ".join(str(error).split()) or type(error).__name__
        # Under `accelerate launch` every process finds the same error: one message is enough.
        sys.exit(f"{command}: {message}" if os.environ.get("RANK", "0") == "0" else 1)
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.exit(130)


def _run(args):
    if args.command == "train":
        # Not returned: the console script passes main()'s value to sys.exit, which would read a dict as a failure.
        train(args.stage, args.config, args.resume, overwrite=args.overwrite)
    elif args.command == "demo":
        if args.vision_model is not None:
            check_model_path(args.vision_model, "--vision-model")
        from .demo import run_demo

        metrics = run_demo(args.out, args.steps, args.batch_size, args.learning_rate, args.vision_model, args.seed)
        print(
            f"loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}; report: {Path(args.out) / 'report.md'}"
        )
        for name, row in metrics["held_out"].items():
            print(f"  {name}: {row['num_tokens']} tokens, held-out L1 {row['l1_before']:.3f} -> {row['l1_after']:.3f}")
    elif args.command == "segment":
        segment(args.images, args.expression, args.model, args.out, args.recursive, args.skip_bad)
    elif args.command == "edit":
        edit(
            args.images,
            args.instruction,
            args.model,
            args.out,
            args.guidance_scale,
            args.image_guidance_scale,
            args.steps,
            args.seed,
            args.recursive,
            args.skip_bad,
        )
    else:
        tokenize(args.images, args.model, args.out, args.batch_size, args.recursive, args.skip_bad)


if __name__ == "__main__":
    main()
