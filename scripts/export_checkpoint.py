"""Export a saved Setokim as a self-contained folder (remote code, processor, model card), optionally pushed.

python scripts/export_checkpoint.py --model path/to/setokim --out exported/ --repo me/setokim [--push]
"""

import argparse

from transformers import AutoModelForImageTextToText, AutoProcessor

import transformers_setok  # noqa: F401  (registers the Setokim classes)
from transformers_setok.hub import export_setokim, push_folder_to_hub


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved Setokim folder (model and processor)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--repo", required=True, help="Hub repo id named in the model card (and pushed to)")
    parser.add_argument("--name", default=None, help="model card title (default: the repo id)")
    parser.add_argument("--provenance", default="", help="a paragraph on how the model was trained")
    parser.add_argument("--push", action="store_true", help="upload the folder to --repo (HF_ENDPOINT is honoured)")
    args = parser.parse_args(argv)

    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    folder = export_setokim(
        model, processor, args.out, name=args.name or args.repo, repo=args.repo, provenance=args.provenance
    )
    print(f"exported to {folder}")
    if args.push:
        print(f"pushed: {push_folder_to_hub(folder, args.repo)}")


if __name__ == "__main__":
    main()
