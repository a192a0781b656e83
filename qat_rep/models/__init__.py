"""Model families, registered by name (see :func:`create_model` and :func:`list_models`)."""

from . import efficientrep, repvgg, yolov6  # noqa: F401  (registers the families)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
