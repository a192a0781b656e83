"""Model families, registered by name (see :func:`create_model` and :func:`list_models`)."""

from . import efficientrep, repvgg  # noqa: F401  (registers the families)
from .efficientrep import EfficientRep
from .registry import create_model, list_models, model_entrypoint, register_model
from .repvgg import RepVGG, RepVGGCfg

__all__ = ["create_model", "list_models", "model_entrypoint", "register_model", "RepVGG", "RepVGGCfg", "EfficientRep"]
