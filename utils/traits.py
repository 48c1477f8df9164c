"""Trait vectors for Section 7 of Part 1.

- ``TRAITS_SUBSET``: 12 of the paper's 240 traits, chosen to spread along the Assistant Axis. The paper
  finds transparent / grounded / flexible at the assistant end and enigmatic / subversive / dramatic at
  the role-play end; the list alternates between the two ends, so any prefix of 2 or more spans both.
- ``load_precomputed_trait_vectors(model_name, layer)``: the paper's Gemma 2 27B trait vectors from the
  Hugging Face hub, or ``None`` with a printed reason, in which case the notebook computes them itself.
"""

from __future__ import annotations

import huggingface_hub
import torch
from huggingface_hub.errors import EntryNotFoundError
from jaxtyping import Float
from torch import Tensor

from utils.models import GEMMA2_27B

HF_REPO_ID = "lu-christina/assistant-axis-vectors"
# Model name -> folder inside HF_REPO_ID holding ``trait_vectors/<trait>.pt``.
PRECOMPUTED_FOLDERS = {GEMMA2_27B: "gemma-2-27b"}

# Alternating: assistant-like end, role-play end, ...
TRAITS_SUBSET: list[str] = [
    "transparent", "enigmatic",
    "grounded", "mystical",
    "analytical", "dramatic",
    "methodical", "whimsical",
    "cautious", "theatrical",
    "calm", "subversive",
]


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub could not give us the file" (network down, offline mode, 404, ...).

    ``OSError`` covers ``ConnectionError``, ``huggingface_hub``'s HTTP errors, ``LocalEntryNotFoundError``
    (raised when the hub is unreachable and the file is not cached) and ``requests`` errors. Transport
    errors of the HTTP clients ``huggingface_hub`` may use are added when importable.
    """
    errors: list[type[BaseException]] = [OSError, EntryNotFoundError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _select_layer(vector: Float[Tensor, " d_model"] | Float[Tensor, "n_layers d_model"], layer: int,
                  trait: str) -> Float[Tensor, " d_model"]:
    """``[d_model]`` from a ``[d_model]`` vector or row ``layer`` of a ``[n_layers, d_model]`` stack.

    The paper's files are ``[46, 4608]`` for Gemma 2 27B; row ``i`` is the output of block
    ``model.model.layers[i]`` (the course's layer convention, and the paper's: it steers with
    ``axis[22]`` at ``layer_indices=[22]``).
    """
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"Trait vector file for {trait!r} holds a {type(vector).__name__}, not a tensor.")
    if vector.ndim == 1:
        return vector.float()
    if vector.ndim == 2:
        if not -vector.shape[0] <= layer < vector.shape[0]:
            raise ValueError(f"Layer {layer} is out of range for {trait!r}'s trait vectors of shape "
                             f"{tuple(vector.shape)} ([n_layers, d_model]).")
        return vector[layer].float()
    raise ValueError(f"Expected a [d_model] or [n_layers, d_model] tensor for {trait!r}, got shape "
                     f"{tuple(vector.shape)}.")


def load_precomputed_trait_vectors(
    model_name: str, layer: int, traits: list[str] | None = None
) -> tuple[dict[str, Float[Tensor, " d_model"]] | None, str]:
    """The paper's precomputed trait vectors at ``layer``, when there are any and the hub is reachable.

    Only ``google/gemma-2-27b-it`` has them (``gemma-2-27b/trait_vectors/<trait>.pt`` in the dataset
    ``lu-christina/assistant-axis-vectors``). Files are loaded with ``torch.load(weights_only=True)``,
    so a file holding anything but tensors is rejected.

    Args:
        model_name: the model the notebook runs.
        layer: the block whose output the vectors are read at (row ``layer`` of a 2-D file).
        traits: trait names (default ``TRAITS_SUBSET``).

    Returns:
        ``(vectors, source)``: trait -> float32 ``[d_model]`` and a sentence saying where they came from;
        or ``(None, reason)`` when there are no precomputed vectors for this model or the hub cannot be
        reached. The notebook prints the sentence either way.

    Raises:
        Anything other than a hub/network error, e.g. a corrupt or unsafe file, propagates.
    """
    traits = list(TRAITS_SUBSET if traits is None else traits)
    folder = PRECOMPUTED_FOLDERS.get(model_name)
    if folder is None:
        return None, f"no precomputed vectors for {model_name}: computing them for this model"
    paths = {}
    for trait in traits:
        filename = f"{folder}/trait_vectors/{trait}.pt"
        try:
            paths[trait] = huggingface_hub.hf_hub_download(repo_id=HF_REPO_ID, repo_type="dataset",
                                                           filename=filename)
        except _hub_errors() as exc:
            return None, (f"could not reach the Hugging Face hub ({type(exc).__name__}): computing trait "
                          f"vectors for this model instead")
    # Outside the try: a corrupt or non-tensor file is an error to see, not a reason to fall back.
    vectors = {trait: _select_layer(torch.load(path, map_location="cpu", weights_only=True), layer, trait)
               for trait, path in paths.items()}
    return vectors, (f"precomputed by the paper (Hugging Face {HF_REPO_ID}, {folder}/trait_vectors, "
                     f"layer {layer})")
