"""One validated recipe: every option that decides a checkpoint's numbers.

The quantizer's CLI builds it from its flags, :func:`~.pipeline.quantize_model`
takes it (or its fields as keyword arguments), the evaluation builds it for its
in-memory recipes, and ``scalesweep.json`` records it under ``"recipe"``
(:meth:`Recipe.to_json`; :meth:`Recipe.from_json` reads it back). Everything is
checked once, here, before a model is loaded: a bad option is a ValueError naming
the field and the choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import hessian_sweep
from . import objectives
from . import scheme as schemes
from .gptq import GPTQConfig

__all__ = [
    "DEFAULT_GLOBAL_SCALE",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "ROPE_BIAS_MODES",
    "Recipe",
]

#: Defaults sized for the default model on 2 CPU cores (a few minutes end to end).
DEFAULT_NUM_SAMPLES = 64
DEFAULT_SEQ_LEN = 256
#: The default global scale: compressed-tensors' and vLLM's 448*6/amax. Chosen from
#: the 64k-token accuracy table (benchmarks/RESULTS.md, issue 16): with it ScaleSweep
#: WMSE's KLD is lower in every setting (by 1-3%, on both halves of the text) at equal
#: perplexity, AbsMax's by 7-8%, and it is the scale every other NVFP4 tool writes.
DEFAULT_GLOBAL_SCALE = "compressed-tensors"
ROPE_BIAS_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how (see the module docstring).

    ``scheme``: W4A16 | W4A4 | W4A4KV4 | W4A4KV4Q4. ``objective``: the weight
    block-scale objective (:mod:`.objectives`: absmax, mse, wmse, hessian, or the
    evaluation baseline four_over_six). ``global_scale_convention``: paper |
    compressed-tensors. ``gptq``: None (round to nearest) or a
    :class:`~.gptq.GPTQConfig` (True or a dict are accepted and converted).
    ``hessian_damp``: the ``hessian`` objective's relative damping of each 16x16
    block (ignored by the others). ``rope_bias``: auto | on | off.
    ``num_samples`` x ``seq_len``: calibration tokens.
    """

    scheme: str = "W4A4"
    objective: str = "wmse"
    global_scale_convention: str = DEFAULT_GLOBAL_SCALE
    runtime_global_scale_convention: str | None = None
    gptq: GPTQConfig | None = None
    hessian_damp: float = hessian_sweep.DEFAULT_DAMP
    rope_bias: str = "auto"
    num_samples: int = DEFAULT_NUM_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN

    def __post_init__(self):
        set_ = object.__setattr__  # normalise in place (the dataclass is frozen)
        set_(self, "scheme", schemes.get_scheme(self.scheme).name)
        objectives.get_objective(self.objective)  # raises naming the choices
        schemes.check_convention(self.global_scale_convention)
        if self.runtime_global_scale_convention is not None:
            schemes.check_convention(self.runtime_global_scale_convention)
        set_(self, "gptq", GPTQConfig.parse(self.gptq))
        damp = self.hessian_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp):
            raise ValueError(f"hessian_damp must be a finite number, got {damp!r}")
        if not hessian_sweep.DAMP_MIN <= damp <= hessian_sweep.DAMP_MAX:
            raise ValueError(
                f"hessian_damp must be in [{hessian_sweep.DAMP_MIN}, "
                f"{hessian_sweep.DAMP_MAX}], got {damp}"
            )
        set_(self, "hessian_damp", float(damp))
        mode = {True: "on", False: "off"}.get(self.rope_bias, self.rope_bias)
        if mode not in ROPE_BIAS_MODES:
            raise ValueError(f"rope_bias must be auto, on or off, not {self.rope_bias!r}")
        set_(self, "rope_bias", mode)
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def scheme_spec(self) -> schemes.Scheme:
        return schemes.get_scheme(self.scheme)

    def weight_objective(self) -> objectives.Objective:
        """The objective of the scales stage, configured by this recipe."""
        return objectives.get_objective(self.objective, hessian_damp=self.hessian_damp)

    @property
    def runtime_convention(self) -> str:
        """The global-scale convention of activations, KV cache and queries."""
        return self.runtime_global_scale_convention or self.global_scale_convention

    @property
    def runtime_method(self) -> str:
        """The method recorded for activations, KV cache and queries."""
        return self.weight_objective().runtime_method

    @property
    def needs_hessian(self) -> bool:
        """Whether calibration must gather ``E[x x^T]`` per Linear input."""
        return self.gptq is not None or self.weight_objective().needs_hessian

    def replace(self, **changes) -> Recipe:
        """A copy with ``changes`` (field names; TypeError for unknown ones)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown recipe options {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, recipe: Recipe | None = None, **options) -> Recipe:
        """``recipe`` (default: the defaults) with ``options`` applied."""
        return (recipe or cls()).replace(**options) if options else (recipe or cls())

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["gptq"] = None if self.gptq is None else dataclasses.asdict(self.gptq)
        return d

    @classmethod
    def from_json(cls, data: dict) -> Recipe:
        """The recipe recorded by :meth:`to_json` (scalesweep.json's ``"recipe"``)."""
        if not isinstance(data, dict):
            raise ValueError(f"a recipe is a JSON object, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return cls(**data)

    def tag(self) -> str:
        """A short human name: ``wmse+gptq(inloop)/compressed-tensors``."""
        g = ""
        if self.gptq is not None:
            extra = [self.gptq.scales] if self.gptq.scales != "fixed" else []
            if self.gptq.actorder == "column":
                extra.append("column")
            g = "+gptq" + (f"({','.join(extra)})" if extra else "")
        rt = self.runtime_global_scale_convention
        conv = self.global_scale_convention + (f",runtime {rt}" if rt else "")
        return f"{self.objective}{g}/{conv}"
