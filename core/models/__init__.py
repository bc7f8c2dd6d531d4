"""Representations: the pretrained image backbone and the table encoder."""
from core.models.device import resolve_device
from core.models.encoder import Encoder, load_encoder, make_encoder

__all__ = ["Encoder", "load_encoder", "make_encoder", "resolve_device"]
