from .decoder_layer import DecoderLayer
from .feedforward import FeedForward
from .positional import POSITIONAL_REGISTRY, build_positions

__all__ = ["DecoderLayer", "FeedForward", "POSITIONAL_REGISTRY", "build_positions"]
