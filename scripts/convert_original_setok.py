"""Convert an upstream SeTok research checkpoint (github ChocoWu/SeTok) into a SeTok or Setokim folder.

python scripts/convert_original_setok.py --checkpoint pytorch_model.bin --out setok-converted/ [--config cfg.json]

A stage-1 tokenizer file becomes a SetokForImageReconstruction, a full MLLM a SetokimForConditionalGeneration. The
report lists what was mapped, what has no counterpart and why, which of our weights keep their initialisation, and
where the result is not exactly upstream's network. The logic lives in `transformers_setok.conversion`, whose entry
point is `transformers_setok/conversion/convert.py`.
"""

import argparse
import sys

import torch

from transformers_setok.conversion import (
    build_converted_model,
    convert_checkpoint,
    detect_kind,
    load_config,
    load_upstream_checkpoint,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="upstream state dict: .bin/.pt (torch.save) or .safetensors file, a sharded save's *.index.json, or a "
        "folder holding either",
    )
    parser.add_argument(
        "--kind", choices=("tokenizer", "mllm"), help="checkpoint kind (default: from its key prefixes)"
    )
    parser.add_argument(
        "--config",
        help="SetokConfig/SetokimConfig json or saved folder giving the target geometry "
        "(default: read from the checkpoint's shapes, the rest from the paper's defaults)",
    )
    parser.add_argument("--out", help="folder to save the converted model to (save_pretrained); omit to only report")
    parser.add_argument("--strict", action="store_true", help="fail when an upstream key matches no conversion rule")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved model")
    args = parser.parse_args(argv)

    upstream = load_upstream_checkpoint(args.checkpoint)
    kind = args.kind or detect_kind(upstream)
    config = load_config(args.config, kind) if args.config else None
    result = convert_checkpoint(upstream, kind, config)
    print(f"{args.checkpoint}: {kind} checkpoint\n{result.report()}")
    if args.strict and result.unrecognised:
        print(f"--strict: {len(result.unrecognised)} upstream keys match no conversion rule; nothing saved.")
        return 1
    if args.out:
        build_converted_model(result, DTYPES[args.dtype]).save_pretrained(args.out)
        print(f"saved {result.model_class.__name__} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
