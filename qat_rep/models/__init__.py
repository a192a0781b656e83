"""Model families, registered by name (see :func:`create_model` and :func:`list_models`)."""

from . import efficientrep, repvgg, yolov6  # noqa: F401  (registers the families)
from .efficientrep import EfficientRep
from .registry import create_model, list_models, model_entrypoint, register_model
from .repvgg import RepVGG, RepVGGCfg
from .yolov6 import YOLOv6

__all__ = ["create_model", "list_models", "model_entrypoint", "register_model", "RepVGG", "RepVGGCfg", "EfficientRep", "YOLOv6"]
