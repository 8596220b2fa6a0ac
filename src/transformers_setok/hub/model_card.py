"""Model cards filled from the templates of the top-level `model_cards/` folder (shipped inside the package as
`transformers_setok.model_cards`, so a wheel install has them) with a model's real config."""

import re
from importlib import metadata, resources


def _template(name: str) -> str:
    return resources.files("transformers_setok.model_cards").joinpath(name).read_text(encoding="utf-8")


def supported_transformers() -> str:
    """The transformers range this package allows, and CI tests at both ends, as pyproject.toml declares it."""
    for requirement in metadata.requires("transformers-setok") or []:
        match = re.fullmatch(r"transformers\s*\(?([^;()]+)\)?", requirement.split(";")[0].strip())
        if match:
            # Lower bound first, as people write it: ">=5.23,<5.25".
            specifiers = sorted(match.group(1).replace(" ", "").split(","), key=lambda spec: not spec.startswith(">"))
            return ",".join(specifiers)
    raise RuntimeError("The installed transformers-setok declares no transformers requirement.")


def _setok_fields(config) -> dict:
    return dict(
        vision_model_type=config.vision_config.model_type,
        grid=config.grid_size,
        vision_width=config.vision_config.hidden_size,
        token_dim=config.token_dim,
        cluster_method=config.cluster_method,
        cluster_k=config.cluster_k,
        cluster_threshold=config.cluster_threshold,
        max_num_clusters=config.max_num_clusters or "N",
        reconstruction_size=config.reconstruction_size,
    )


def render_setok_card(config, *, name: str, repo: str, provenance: str) -> str:
    """The SeTok card for `config` (a `SetokConfig`)."""
    return _template("setok.md").format(
        name=name, repo=repo, provenance=provenance, transformers=supported_transformers(), **_setok_fields(config)
    )


def render_setokim_card(config, *, name: str, repo: str, provenance: str) -> str:
    """The Setokim card for `config` (a `SetokimConfig`)."""
    text = config.text_config
    return _template("setokim.md").format(
        name=name,
        repo=repo,
        provenance=provenance,
        text_model_type=text.model_type,
        text_layers=text.num_hidden_layers,
        text_width=text.hidden_size,
        vocab_size=text.vocab_size,
        generation=_generation_paragraph(config),
        transformers=supported_transformers(),
        **_setok_fields(config.vision_config),
    )


def _generation_paragraph(config) -> str:
    if not getattr(config, "use_generation_head", False):
        return ""
    return (
        "\n\nIt also draws images: the LLM writes `[Img]`, the image's length and `[/Img]`, and a diffusion head "
        f"({config.generation_head_depth} adaLN blocks of width {config.generation_head_width}, "
        f"{config.diffusion_prediction_type}, `{config.diffusion_beta_schedule}` schedule) conditioned on its hidden "
        "states draws each SeTok token, which SeTok's detokenizer paints. Sampling needs the `transformers-setok` "
        "package with diffusers: `transformers_setok.pipelines.SetokimTextToImagePipeline`."
    )
