"""Shared machinery for the persona-space course (models, data, chat formatting, backends, plots).

``from utils import load_model`` works; the names below are imported lazily, so that
``python -m utils.models --prepare`` does not import ``utils.models`` twice.
"""

_FROM_MODELS = ("GEMMA2_27B", "SMOLLM2", "TINY", "ModelLoadError", "choose_model", "default_layer",
                "load_model", "short_model_name")

__all__ = list(_FROM_MODELS)


def __getattr__(name: str):
    if name in _FROM_MODELS:
        from utils import models

        return getattr(models, name)
    raise AttributeError(f"module 'utils' has no attribute {name!r}")
