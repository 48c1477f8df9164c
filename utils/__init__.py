"""Shared machinery for the persona-space course, one module per concept (see docs/conventions.md).

``from utils import load_model`` works: the names below come from :mod:`utils.models`.
"""

from utils.models import (GEMMA2_27B, MODEL_CONFIGS, SMOLLM2, TINY, ModelLoadError, choose_model, default_layer,
                          load_model, model_config, short_model_name)

__all__ = ["GEMMA2_27B", "MODEL_CONFIGS", "SMOLLM2", "TINY", "ModelLoadError", "choose_model", "default_layer",
           "load_model", "model_config", "short_model_name"]
