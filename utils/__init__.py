"""Shared machinery for the persona-space course (models, data, chat formatting, backends, plots)."""

from utils.models import (  # noqa: F401
    GEMMA2_27B, SMOLLM2, TINY, ModelLoadError, choose_model, default_layer, load_model, short_model_name,
)
