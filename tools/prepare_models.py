"""Build tiny-gemma2 and dequantise SmolLM2 into the model cache: ``python -m tools.prepare_models``."""

from utils.models import prepare_offline_models

if __name__ == "__main__":
    prepare_offline_models()
