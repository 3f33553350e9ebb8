"""Optional integrations with other quantization toolkits.

Each submodule imports its peer library on import (they are not dependencies of
this package): ``scalesweep_vllm.integrations.llmcompressor`` registers the
ScaleSweep weight observers with llm-compressor.
"""
