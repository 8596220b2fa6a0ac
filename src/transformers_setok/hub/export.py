"""Self-contained Setokim folders for the Hub: weights, remote code, processor, model card."""

import shutil
from pathlib import Path

from .model_card import render_setokim_card
from .remote_pipelines import write_drawing_pipelines

__all__ = ["export_setokim", "push_folder_to_hub"]


def export_setokim(model, processor, folder, *, name: str, repo: str, provenance: str = "") -> Path:
    """Write `model` and `processor` to `folder` so that it loads with `trust_remote_code=True` anywhere.

    The folder holds the weights (safetensors), the modeling and processing code with `auto_map` (transformers' own
    `pipeline("image-text-to-text")` runs it), the processor, tokenizer and chat template, the generation config and a model card filled
    from `model_cards/setokim.md` with the real config. A model with a mask decoder also carries the referring
    segmentation pipeline (`custom_pipelines`: `pipeline("referring-segmentation", model=folder,
    trust_remote_code=True)`). A model with a generation head also carries the image-editing and text-to-image
    pipelines as diffusers remote code (`remote_pipelines`: their code, `scheduler/` and a `model_index.json` naming
    the editing pipeline), which run without this package:

    ```python
    >>> from diffusers import DiffusionPipeline
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    >>> edit = DiffusionPipeline.from_pretrained(folder, model=model, processor=processor, trust_remote_code=True)
    >>> draw = DiffusionPipeline.from_pretrained(
    ...     folder, custom_pipeline="pipeline_setokim_text_to_image", model=model, processor=processor,
    ...     trust_remote_code=True,
    ... )
    ```

    (`folder` may be the Hub repo it was pushed to; the scheduler comes from the folder.) The classes and config are
    left as they were.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = (type(model), type(model.config), type(processor), type(processor.image_processor))
    previous_auto = {cls: cls.__dict__.get("_auto_class") for cls in classes}
    try:
        model.register_for_auto_class("AutoModelForImageTextToText")
        model.config.register_for_auto_class()
        processor.register_for_auto_class("AutoProcessor")
        processor.image_processor.register_for_auto_class("AutoImageProcessor")
        with _segmentation_pipeline_declared(model, folder):
            model.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_drawing_pipelines(model, folder)
    finally:
        for cls, auto_class in previous_auto.items():
            if auto_class is not None:
                cls._auto_class = auto_class
            elif "_auto_class" in cls.__dict__:
                delattr(cls, "_auto_class")
    card = render_setokim_card(model.config, name=name, repo=repo, provenance=provenance)
    (folder / "README.md").write_text(card)
    return folder


class _segmentation_pipeline_declared:
    """While saving a model with a mask decoder: its config names the segmentation pipeline (transformers'
    `custom_pipelines`, the entry `Pipeline.save_pretrained` writes for a registered pipeline), and the pipeline's
    file, self-contained like the modeling files, is copied next to them. The model's config is left as it was."""

    def __init__(self, model, folder: Path):
        self.model, self.folder = model, folder

    def __enter__(self):
        from ..pipelines import referring_segmentation

        config = self.model.config
        self.previous = config.__dict__.get("custom_pipelines")
        if not getattr(config, "use_mask_decoder", False):
            return self
        pipeline = referring_segmentation.SetokimReferringSegmentationPipeline
        module = Path(referring_segmentation.__file__)
        config.custom_pipelines = {
            referring_segmentation.SEGMENTATION_TASK: {
                "impl": f"{module.stem}.{pipeline.__name__}",
                "pt": ["AutoModelForImageTextToText"],
                "type": "multimodal",
            }
        }
        shutil.copyfile(module, self.folder / module.name)
        return self

    def __exit__(self, *exc):
        config = self.model.config
        if self.previous is None:
            config.__dict__.pop("custom_pipelines", None)
        else:
            config.custom_pipelines = self.previous
        return False


def push_folder_to_hub(folder, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a folder written by `export_setokim` to `repo_id`, creating the repo if needed; returns the commit URL.

    The endpoint follows `HF_ENDPOINT`. Pushing an unchanged folder again makes no commit and returns the URL of the
    last one.
    """
    from huggingface_hub import HfApi

    # Checked before anything reaches the Hub, so that a wrong path does not leave an empty repo behind.
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        problem = "has no config.json" if folder.is_dir() else "is not a folder"
        raise FileNotFoundError(f"`folder` {str(folder)!r} {problem}; expected a folder written by `export_setokim`")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload Setokim"))
