from .state import DecoderState, HiddenMemory, TensorState

__all__ = ["DecoderState", "HiddenMemory", "TensorState"]
