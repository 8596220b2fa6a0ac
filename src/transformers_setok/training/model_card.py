"""Model cards filled from the templates in the repository's `model_cards/` folder with a model's real config."""

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[3] / "model_cards"


def render_setok_card(config, *, name: str, repo: str, provenance: str, template: Path | None = None) -> str:
    """The SeTok card for `config` (a `SetokConfig`)."""
    template = template or TEMPLATES / "setok.md"
    if not template.is_file():
        raise FileNotFoundError(f"Model card template not found: {template} (run from a source checkout).")
    return template.read_text().format(
        name=name,
        repo=repo,
        provenance=provenance,
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
