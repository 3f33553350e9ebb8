"""Calibration statistics, collected layer by layer in one pass.

The model stays on the host; the decoder layers visit the device one at a time
(the approach of GPTQ-style sequential pipelines), so a model larger than the
device fits as long as one decoder layer plus the calibration activations do.

1. Embeddings (and everything outside the decoder stack except the head) run on
   the device; a forward pre-hook on decoder layer 0 records its inputs (hidden
   states and keyword arguments: rotary cos/sin, mask, positions) and stops the
   forward.
2. Each decoder layer in turn moves to the device, runs every batch with forward
   pre-hooks on its Linears and the attention recorder below, and its outputs
   become the next layer's inputs. The statistics are those of the unquantized
   model (one forward pass of the original model, split by layer).

Per quantized Linear: the per-input-channel second moment E[x^2] (the WMSE weight
of the weight's blocks) and max|x| (the input global scale); for GPTQ
(``hessians=True``) also ``H = sum x x^T`` (float32 [K, K]), one per fused group
(partners share their input, so they share one H: only the first partner's hook
accumulates it).

Sequential GPTQ (``replacements`` given): the layer's outputs, which become the next
layer's inputs, are computed after the caller has quantized the layer, with the
caller's quantized weights swapped in for that forward only. Then every layer is
calibrated on what the already quantized layers before it produce (as GPTQ and
llm-compressor do); the weights of the model itself are left untouched.

Per attention module: max|q|, max|k|, max|v| and the per-head, per-channel second
moments of q and k, taken *after* the rotary embedding (and any q/k norm), i.e.
what attention sees. They are captured by wrapping the attention function, not
the module: transformers 5.x attention modules call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)``
with post-rotary q ``[B, H, T, D]`` and k/v ``[B, H_kv, T, D]`` (before GQA
repetition). We register one extra implementation that records them and then
calls the model's own implementation, and select it on the config only while a
decoder layer runs; masks were built earlier with the original setting. Models
whose attention does not go through that interface give no attention statistics
(reported, not an error).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import LayerPlan

__all__ = ["AttentionStats", "LinearStats", "LayerStats", "calibrate_layers", "wmse_weight"]

_IMPL_NAME = "scalesweep_calibration"
#: Relative floor of the WMSE weight: a channel never activated during calibration
#: keeps 1e-6 of the mean weight, so an all-silent block still gets a sensible
#: (MSE-like) scale instead of an arbitrary one.
WMSE_FLOOR = 1e-6


@dataclass
class LinearStats:
    """Running input statistics of one Linear."""

    sum_sq: torch.Tensor  # float64 [K]
    count: int = 0
    amax: float = 0.0
    hessian: torch.Tensor | None = None  # float32 [K, K] sum of x x^T, shared by partners
    owns_hessian: bool = False  # this Linear's hook accumulates ``hessian``
    #: float32 [K, K] sum of x_fp x_q^T (paired calibration: the original model's input
    #: x_fp and the quantized model's x_q of the same token), shared like ``hessian``
    cross: torch.Tensor | None = None

    def mean_sq(self) -> torch.Tensor:
        """E[x^2] per input channel (float32)."""
        return (self.sum_sq / max(self.count, 1)).to(torch.float32)

    def hessian_mean(self) -> torch.Tensor | None:
        """``H / n = E[x x^T]`` (float32 [K, K]), None when not collected."""
        if self.hessian is None:
            return None
        return self.hessian / max(self.count, 1)


@dataclass
class AttentionStats:
    """Post-rotary q/k/v statistics of one attention module."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_sum_sq: torch.Tensor  # float64 [H, D]
    k_sum_sq: torch.Tensor  # float64 [H_kv, D]
    count: int = 0  # tokens (per head)
    q_amax: float = 0.0
    k_amax: float = 0.0
    v_amax: float = 0.0
    #: max|q - R_p b_q|, max|k - R_p b_k| for the components quantized around their
    #: rotary bias (:mod:`scalesweep_vllm.rope_bias`); empty when not.
    residual_amax: dict[str, float] = field(default_factory=dict)

    def q_mean_sq(self) -> torch.Tensor:
        return (self.q_sum_sq / max(self.count, 1)).to(torch.float32)

    def k_mean_sq(self) -> torch.Tensor:
        return (self.k_sum_sq / max(self.count, 1)).to(torch.float32)


@dataclass
class LayerStats:
    """Statistics of one decoder layer: Linears by full name, attention by module prefix."""

    index: int
    linears: dict[str, LinearStats] = field(default_factory=dict)
    attention: dict[str, AttentionStats] = field(default_factory=dict)


def wmse_weight(stats: LinearStats) -> torch.Tensor:
    """The WMSE weight of a Linear's weight blocks: E[x^2] per input channel plus a
    floor of :data:`WMSE_FLOOR` times its mean (float32 [K], > 0 unless all zero)."""
    m = stats.mean_sq()
    mean = float(m.mean()) if m.numel() else 0.0
    if mean <= 0.0:
        return torch.ones_like(m)
    return m + WMSE_FLOOR * mean


# ---------------------------------------------------------------------------
# The attention recorder
# ---------------------------------------------------------------------------

_RECORDER: dict = {"fn": None, "impl": None}


def _calibration_attention(module, query, key, value, attention_mask, *args, **kwargs):
    rec = _RECORDER["fn"]
    if rec is not None:
        rec(module, query, key, value, kwargs)
    return _original_attention(module)(module, query, key, value, attention_mask, *args, **kwargs)


def _original_attention(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = _RECORDER["impl"]
    if impl and impl != "eager" and impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[impl]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return eager if eager is not None else ALL_ATTENTION_FUNCTIONS["sdpa"]


def _register_impl() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - very old transformers
        return False
    AttentionInterface.register(_IMPL_NAME, _calibration_attention)
    return True


@contextlib.contextmanager
def _recording_attention(config, recorder) -> Iterator[None]:
    """Route attention through the recorder while the block runs."""
    if config is None or not _register_impl():
        yield
        return
    old = getattr(config, "_attn_implementation", None)
    _RECORDER["fn"], _RECORDER["impl"] = recorder, old
    config._attn_implementation = _IMPL_NAME
    try:
        yield
    finally:
        config._attn_implementation = old
        _RECORDER["fn"], _RECORDER["impl"] = None, None


# ---------------------------------------------------------------------------
# Moving parts of the model
# ---------------------------------------------------------------------------


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Move to ``device``; cast floating *parameters* (not buffers: rotary
    ``inv_freq`` must stay fp32) to ``dtype``."""
    module.to(device)
    if dtype is not None:
        for p in module.parameters(recurse=True):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


class _Stop(Exception):
    pass


def _outside_layers(model: nn.Module, plan: LayerPlan) -> list[nn.Module]:
    """Leaf-ish modules that own parameters/buffers outside the decoder stack."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = plan.layers_prefix + "."
    out = []
    for name, mod in model.named_modules():
        if name == plan.layers_prefix or name.startswith(prefix) or mod is head:
            continue
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if own:
            out.append(mod)
    return out


def _first_layer_inputs(model, plan, tokens, batch_size, device, dtype):
    """Run everything before decoder layer 0 and return its inputs per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        kw["past_key_values"] = None
        captured.append((hidden, kw))
        raise _Stop

    outside = _outside_layers(model, plan)
    saved = [(m, next(iter(m.parameters(recurse=False)), None)) for m in outside]
    orig_dtypes = {id(m): (p.dtype if p is not None else None) for m, p in saved}
    for m in outside:
        _move(m, device, dtype)
    handle = plan.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(device)
            with contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
        for m in outside:
            _move(m, torch.device("cpu"), orig_dtypes[id(m)])
    return captured


def calibrate_layers(
    model: nn.Module,
    plan: LayerPlan,
    tokens: torch.Tensor,
    device: torch.device,
    compute_dtype: torch.dtype,
    batch_size: int = 8,
    progress: bool = False,
    hessians: bool = False,
    replacements: dict[str, torch.Tensor] | None = None,
    rope=None,
    paired: bool = False,
) -> Iterator[tuple[int, nn.Module, LayerStats]]:
    """Yield ``(index, layer, stats)`` per decoder layer, the layer on ``device``
    in ``compute_dtype`` while the caller handles it (quantize it then); it goes
    back to the host in its original dtype when the caller asks for the next one.

    ``hessians``: also accumulate H per fused group (module docstring).
    ``replacements``: a dict the caller fills, while it handles a layer, with
    quantized weights by Linear name; the layer's outputs are then computed with
    those weights (sequential GPTQ), and the dict is emptied.
    ``rope``: a :class:`scalesweep_vllm.rope_bias.HFRope` of ``model``: also record
    the amax of q and k less their rotary bias (``AttentionStats.residual_amax``).
    """
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if len(kinds) > 1:
        # layer 0's captured mask would be reused for layers of another kind (sliding
        # window vs full): the statistics would be wrong, so refuse instead
        raise NotImplementedError(
            f"models mixing attention layer types {sorted(kinds)} (config.layer_types) are "
            "not supported by the layer-by-layer calibration yet"
        )
    if paired and replacements is None:
        raise ValueError("paired calibration needs sequential replacements")
    with torch.no_grad():
        inputs = _first_layer_inputs(model, plan, tokens, batch_size, device, compute_dtype)
        # the original model's stream (paired): same first inputs, never quantized
        inputs_fp = list(inputs) if paired else None
        names = {id(t.module): t.name for row in plan.targets for t in row}
        layer_iter = range(len(plan.layers))
        if progress:
            from tqdm.auto import tqdm

            layer_iter = tqdm(layer_iter, desc="calibrate+quantize layers", unit="layer")
        for i in layer_iter:
            layer = plan.layers[i]
            p0 = next(layer.parameters(), None)
            orig_dtype = p0.dtype if p0 is not None else None
            _move(layer, device, compute_dtype)
            stats = LayerStats(i)
            prefixes = {
                id(m): f"{plan.layers_prefix}.{i}.{n}" if n else f"{plan.layers_prefix}.{i}"
                for n, m in layer.named_modules()
            }
            hooks = []
            shared: dict[str, torch.Tensor] = {}
            shared_cross: dict[str, torch.Tensor] = {}
            fp_inputs: dict[str, torch.Tensor] = {}  # paired: this batch's x_fp per group
            for t in plan.targets[i]:
                k = t.module.in_features
                st = LinearStats(torch.zeros(k, dtype=torch.float64, device=device))
                if hessians:
                    st.owns_hessian = t.group not in shared
                    if st.owns_hessian:
                        shared[t.group] = torch.zeros(k, k, dtype=torch.float32, device=device)
                        if paired:
                            shared_cross[t.group] = torch.zeros_like(shared[t.group])
                    st.hessian = shared[t.group]
                    st.cross = shared_cross.get(t.group)
                stats.linears[t.name] = st
                hooks.append(
                    t.module.register_forward_pre_hook(_linear_hook(st, fp_inputs, t.group))
                )
            recorder = _attention_recorder(stats, prefixes, names, rope)
            keep = replacements is None  # else the outputs come after quantization
            try:
                with _recording_attention(config, recorder):
                    for j, (hidden, kw) in enumerate(inputs):
                        if paired:  # the original stream first: its x_fp per group
                            fp_inputs["record"] = True
                            rec, _RECORDER["fn"] = _RECORDER["fn"], None  # q-stream stats only
                            try:
                                out = layer(inputs_fp[j][0], **inputs_fp[j][1])
                            finally:
                                fp_inputs.pop("record", None)
                                _RECORDER["fn"] = rec
                            inputs_fp[j] = (_hidden(out), kw)
                        out = layer(hidden, **kw)
                        if keep:
                            inputs[j] = (_hidden(out), kw)
                        del out
            finally:
                for h in hooks:
                    h.remove()
            yield i, layer, stats
            del stats, shared
            if not keep:
                _propagate(layer, plan.targets[i], inputs, replacements)
            _move(layer, torch.device("cpu"), orig_dtype)


def _hidden(out):
    """A decoder layer's output hidden states (some layers return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _propagate(layer, targets, inputs, replacements) -> None:
    """The layer's outputs with the caller's quantized weights swapped in (then
    swapped back), written over ``inputs``."""
    saved = []
    try:
        for t in targets:
            new = replacements.get(t.name)
            if new is not None:
                saved.append((t.module.weight, t.module.weight.data))
                t.module.weight.data = new.to(t.module.weight.device, t.module.weight.dtype)
        for j, (hidden, kw) in enumerate(inputs):
            out = layer(hidden, **kw)
            inputs[j] = (_hidden(out), kw)
    finally:
        for p, data in saved:
            p.data = data
        replacements.clear()


def _linear_hook(st: LinearStats, fp_inputs: dict | None = None, group: str = ""):
    def hook(_mod, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if fp_inputs is not None and fp_inputs.get("record"):  # paired, original stream
            if st.owns_hessian:
                fp_inputs[group] = x
            return
        st.sum_sq += (x * x).sum(dim=0, dtype=torch.float64)
        if st.owns_hessian:
            st.hessian.addmm_(x.T, x)
            if st.cross is not None:
                st.cross.addmm_(fp_inputs.pop(group).T, x)
        st.count += x.shape[0]
        if x.numel():
            st.amax = max(st.amax, float(x.abs().max()))

    return hook


def _attention_recorder(stats: LayerStats, prefixes: dict[int, str], names: dict[int, str], rope):
    from ..rope_bias import attention_biases

    def record(module, query, key, value, kwargs):
        prefix = prefixes.get(id(module))
        if prefix is None or query.dim() != 4 or key.dim() != 4:
            return
        q = query.detach().to(torch.float32)
        k = key.detach().to(torch.float32)
        v = value.detach().to(torch.float32)
        st = stats.attention.get(prefix)
        if st is None:
            st = AttentionStats(
                num_heads=q.shape[1],
                num_kv_heads=k.shape[1],
                head_dim=q.shape[-1],
                q_sum_sq=torch.zeros(q.shape[1], q.shape[-1], dtype=torch.float64, device=q.device),
                k_sum_sq=torch.zeros(k.shape[1], k.shape[-1], dtype=torch.float64, device=q.device),
            )
            stats.attention[prefix] = st
        st.q_sum_sq += (q * q).sum(dim=(0, 2), dtype=torch.float64)
        st.k_sum_sq += (k * k).sum(dim=(0, 2), dtype=torch.float64)
        st.count += q.shape[0] * q.shape[2]
        st.q_amax = max(st.q_amax, float(q.abs().max()))
        st.k_amax = max(st.k_amax, float(k.abs().max()))
        st.v_amax = max(st.v_amax, float(v.abs().max()))
        biases = attention_biases(module) if rope is not None else {}
        if biases:
            offs = rope.offsets(biases, kwargs.get("position_ids"), st.head_dim)
            for c, x in (("q", q), ("k", k)):
                if c in offs:
                    r = x.transpose(1, 2) - offs[c].to(x.device)
                    st.residual_amax[c] = max(st.residual_amax.get(c, 0.0), float(r.abs().max()))

    return record
