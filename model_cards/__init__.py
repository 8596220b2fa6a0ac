"""Model-card templates, filled by `transformers_setok.training.model_card` (shipped inside the package)."""
