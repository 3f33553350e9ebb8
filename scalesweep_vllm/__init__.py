"""scalesweep-vllm: NVFP4 post-training quantization with exact ScaleSweep block scales."""

__version__ = "0.1.0"
