"""Fixtures shared by the quantizer's test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from _quantize_models import save_tiny_model, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer (so text calibration works), one per module."""
    path = save_tiny_model("llama", tmp_path_factory.mktemp("src") / "tiny-llama")
    save_tiny_tokenizer(path)
    return path


@pytest.fixture
def calib_txt(tmp_path) -> Path:
    """A small plain-text calibration file."""
    p = tmp_path / "calib.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 40)
    return p
