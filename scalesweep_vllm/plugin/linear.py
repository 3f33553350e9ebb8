"""The NVFP4 Linear method: checkpoint tensors in, one of three GEMM backends out.

Weights load through vLLM's parameter classes, so vLLM's own loaders place the
fused q/k/v and gate/up shards and split them for tensor parallelism
(``vllm/model_executor/parameter.py``; the method is registered for
``weight_loader_v2`` in ``vllm/model_executor/layers/linear.py``).

Backends (chosen once per layer at load, :func:`choose_backend`):

* ``cutlass`` (Blackwell, sm_100/sm_120, W4A4, fp16/bf16 models): activations are
  quantized by ScaleSweep through :func:`scalesweep_vllm.kernels.swizzle.quantize_swizzled`
  (the codes of :func:`scalesweep_vllm.kernels.quantize`, block scales written in the
  swizzled, padded layout by the quantize kernel's own store), and the product runs on vLLM's
  ``cutlass_scaled_fp4_mm`` with ``alpha = 1 / (G_a * G_w)``. Its output is fp16/bf16
  only: a float32 model takes ``dequant``.
* ``packed`` (CPU, W4A16 and W4A4, the default there): the weight stays at 4.5 bits,
  repacked once at load (:func:`scalesweep_vllm.kernels.cpu_gemm.pack`), and each call
  runs our C++ NVFP4 GEMM (``kernels/cpu/nvfp4_gemm.cpp``): W4A16 multiplies the input
  by the dequantized weight (fp32 fused multiply-adds in a fixed order); W4A4 quantizes
  the input with ScaleSweep (the codes :func:`scalesweep_vllm.kernels.quantize` gives) and computes
  the FP4 tensor core's arithmetic (exact integer block products times both block
  scales, an fp32 sum, ``alpha = 1 / (G_a G_w)`` per fused shard at the end); see
  :mod:`scalesweep_vllm.gemm_reference`. ``SCALESWEEP_LINEAR=dequant`` turns it off;
  where the C++ backend cannot be built, ``dequant`` serves and the log says why.
* ``dequant`` (everything else: Hopper, Ampere; CPU without the C++ backend): the
  weight is decoded ONCE at load to the model dtype with
  :func:`scalesweep_vllm.kernels.dequantize`, in compressed-tensors' order
  (``(fp8 scale / G_w) * e2m1`` in fp32, rounded once to the dtype): exactly the
  weights stock compressed-tensors/transformers use. Each call fake-quantizes the
  activation with ScaleSweep (the same codes and scales ``kernels.quantize`` gives)
  and runs a plain GEMM (vLLM's own CPU GEMM on CPUs). E2M1 x E4M3 products are
  exact in bf16; what differs from FP4 tensor cores is only where 1/G is applied
  (before the bf16 rounding here, after the fp32 sum there) and the summation
  order. No weight memory is saved.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)
from vllm.platforms import current_platform

from .. import kernels
from ..kernels import cpu_gemm
from ..nvfp4 import BLOCK_SIZE, E2M1_VALUES
from ..runtime import fused_input_weight
from .compat import LINEAR_ENV, linear_backend

__all__ = ["ScaleSweepLinearMethod", "choose_backend", "log_backend"]

logger = logging.getLogger("vllm.scalesweep")  # under vLLM's configured logger


def _cutlass_fp4_supported() -> bool:
    try:
        from vllm.model_executor.layers.quantization.utils.nvfp4_utils import (
            cutlass_fp4_supported,
        )
    except ImportError:
        return False
    return bool(cutlass_fp4_supported())


def choose_backend(
    act_method: str | None, device: torch.device, dtype: torch.dtype
) -> tuple[str, str]:
    """(``cutlass`` | ``packed`` | ``dequant``, why): ``packed`` on CPUs where the C++
    backend runs, ``cutlass`` on Blackwell for W4A4 in fp16/bf16 when vLLM has its FP4
    GEMM, else the exact fallback (:func:`.compat.linear_backend` decides; this reads
    the device and ``$SCALESWEEP_LINEAR``)."""
    cap = None
    if act_method is not None and device.type == "cuda":
        cap = tuple(torch.cuda.get_device_capability(device))
    cutlass = cap is not None and cap[0] in (10, 12) and _cutlass_fp4_supported()
    name = str(dtype).removeprefix("torch.")
    requested = os.environ.get(LINEAR_ENV, "auto").strip().lower() or "auto"
    packed = None
    if device.type == "cpu" and requested != "dequant":
        packed = cpu_gemm.available()
    return linear_backend(act_method, device.type, cap, name, cutlass, packed, requested)


def log_backend(quant_config, backend: str, why: str) -> None:
    """Say once per model (per quant config object, one per model) which GEMM
    backend its NVFP4 Linear layers use and why; again only if a layer differs."""
    seen = getattr(quant_config, "_scalesweep_backends_logged", None)
    if seen is None:
        seen = set()
        quant_config._scalesweep_backends_logged = seen
    if (backend, why) in seen:
        return
    seen.add((backend, why))
    label = {
        "cutlass": "cutlass (cutlass_scaled_fp4_mm",
        "packed": f"packed (scalesweep C++ GEMM, {_isa()}",
    }.get(backend, "dequant (exact fallback")
    logger.info("scalesweep: linear backend: %s: %s)", label, why)


def _isa() -> str:
    from ..kernels import cpu_backend

    return cpu_backend.isa()


def _tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


#: Parameter names of the checkpoint formats (compressed-tensors' are the internal ones).
_CT_NAMES = {n: n for n in ("weight_packed", "weight_global_scale", "input_global_scale")}
#: ModelOpt's decoding table: ours, except that code 8 decodes to +0 (ours: -0).
_MODELOPT_E2M1 = (*E2M1_VALUES, 0.0, *(-v for v in E2M1_VALUES[1:]))
_MODELOPT_NAMES = {
    "weight_packed": "weight",
    "weight_global_scale": "weight_scale_2",
    "input_global_scale": "input_scale",
}


def modelopt_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """ModelOpt's decode, ``e2m1 * (fp8 * weight_scale_2)`` in fp32 then one cast
    (``NVFP4QTensor.dequantize``, nvidia-modelopt 0.47, its table: code 8 is +0), in
    row chunks."""
    from ..nvfp4 import unpack_fp4

    table = torch.tensor(_MODELOPT_E2M1, dtype=torch.float32, device=packed.device)
    ws2 = weight_scale_2.to(torch.float32).reshape(())
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype, device=packed.device)
    step = max(1, (1 << 22) // max(1, packed.shape[1] * 2))
    for r in range(0, packed.shape[0], step):
        block = (scales[r : r + step].to(torch.float32) * ws2).repeat_interleave(BLOCK_SIZE, -1)
        codes = unpack_fp4(packed[r : r + step]).to(torch.long)
        out[r : r + step] = (table[codes] * block).to(dtype)
    return out


@register_weight_loader_v2_supported_method
class ScaleSweepLinearMethod(LinearMethodBase):
    """NVFP4 weights (W4A16) or weights and runtime-quantized inputs (W4A4)."""

    def __init__(self, quant_config, prefix: str, shards: list[str], act_method: str | None):
        self.quant_config = quant_config
        self.prefix = prefix
        self.shards = shards
        self.act_method = act_method
        #: ModelOpt's export (plugin/modelopt.py): weight / weight_scale / weight_scale_2 /
        #: input_scale, renamed to compressed-tensors' names first thing after loading.
        self.modelopt = getattr(quant_config, "checkpoint_format", None) == "modelopt"
        # A W4A4 checkpoint holds input_global_scale even when the user turned
        # activation quantization off (SCALESWEEP_ACTIVATIONS=off): load and drop it.
        # A weight-only ModelOpt export may still hold input_scale (vLLM drops it too).
        self.has_input_scale = bool(quant_config.ct.activations) or self.modelopt

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        if input_size_per_partition % BLOCK_SIZE:
            raise ValueError(
                f"scalesweep: {self.prefix} has {input_size_per_partition} input features per "
                f"rank, not a multiple of {BLOCK_SIZE}; list it in 'ignore' or change the "
                "tensor-parallel size"
            )
        loader = extra_weight_attrs["weight_loader"]
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        layer.logical_widths = list(output_partition_sizes)
        layer.input_size_per_partition = k
        layer.output_size_per_partition = n
        layer.params_dtype = params_dtype
        names = _MODELOPT_NAMES if self.modelopt else _CT_NAMES
        layer.register_parameter(
            names["weight_packed"],
            ModelWeightParameter(
                data=torch.empty(n, k // 2, dtype=torch.uint8),
                input_dim=1,
                output_dim=0,
                weight_loader=loader,
            ),
        )
        layer.register_parameter(
            "weight_scale",
            GroupQuantScaleParameter(
                data=torch.empty(n, k // BLOCK_SIZE, dtype=torch.float8_e4m3fn),
                input_dim=1,
                output_dim=0,
                weight_loader=loader,
            ),
        )
        shards = len(output_partition_sizes)
        layer.register_parameter(
            names["weight_global_scale"],
            PerTensorScaleParameter(
                data=torch.full((shards,), float("nan"), dtype=torch.float32),
                weight_loader=loader,
            ),
        )
        if self.has_input_scale:
            layer.register_parameter(
                names["input_global_scale"],
                PerTensorScaleParameter(
                    data=torch.full((shards,), float("nan"), dtype=torch.float32),
                    weight_loader=loader,
                ),
            )
        layer.scalesweep_input_weight = self._input_weight(k, input_size)

    def _input_weight(self, k: int, input_size: int) -> torch.Tensor | None:
        """The runtime WMSE weight of the input channels: the sum over fused partners
        (they share one input) of ``P.input_weight``, this rank's slice of it."""
        if self.act_method != "wmse":
            return None
        meta = self.quant_config.meta
        try:  # the same sum the evaluation uses (scalesweep_vllm/runtime.py)
            vec = fused_input_weight(meta.vectors if meta is not None else {}, self.shards)
        except ValueError as err:
            raise ValueError(f"scalesweep: {err}") from err
        if vec.numel() != input_size:
            raise ValueError(
                f"scalesweep: {self.shards[-1]}.input_weight has {vec.numel()} entries, "
                f"expected {input_size}"
            )
        if k != input_size:  # row-parallel: this rank sees a slice of the input features
            r = _tp_rank()
            vec = vec[r * k : (r + 1) * k]
        return vec.contiguous()

    # -- after loading -------------------------------------------------------------
    def _from_modelopt(self, layer: torch.nn.Module) -> None:
        """ModelOpt's tensors under compressed-tensors' names (plugin/modelopt.py):
        ``weight`` -> ``weight_packed`` (same packing), ``G_w = fl(1 / weight_scale_2)``
        per shard, ``G_a = fl(1 / max(input_scale))`` for every shard of the group (as
        vLLM's ``input_global_scale_inv``). The decode factors themselves are kept
        (``scalesweep_ws2``, ``scalesweep_in_scale``) for ModelOpt's decode order and
        vLLM's alpha."""
        ws2 = layer.weight_scale_2.detach().to(torch.float32).clone()
        if not torch.isfinite(ws2).all() or (ws2 <= 0).any():
            raise ValueError(f"scalesweep: {self.prefix}.weight_scale_2 is {ws2.tolist()}")
        layer.weight_packed = Parameter(layer.weight.data, requires_grad=False)
        del layer.weight, layer.weight_scale_2
        layer.weight_global_scale = Parameter(1.0 / ws2, requires_grad=False)
        layer.scalesweep_ws2 = ws2
        ins = layer.input_scale.detach().to(torch.float32).clone()
        del layer.input_scale
        layer.scalesweep_in_scale = None
        if self.act_method is not None:
            if not torch.isfinite(ins).all() or (ins <= 0).any():
                raise ValueError(
                    f"scalesweep: {self.prefix}.input_scale is {ins.tolist()} (W4A4 needs the "
                    "calibrated input scales of every shard)"
                )
            if torch.unique(ins).numel() != 1:
                logger.warning(
                    "scalesweep: %s: fused shards have different input_scale %s; using the "
                    "largest (as vLLM does)",
                    self.prefix,
                    ins.tolist(),
                )
            layer.scalesweep_in_scale = ins.max()
            layer.input_global_scale = Parameter(
                (1.0 / ins.max()).expand(ins.numel()).clone(), requires_grad=False
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.modelopt:
            self._from_modelopt(layer)
        gw = layer.weight_global_scale.detach().to(torch.float32)
        if not torch.isfinite(gw).all() or (gw <= 0).any():
            raise ValueError(f"scalesweep: {self.prefix}.weight_global_scale is {gw.tolist()}")
        device = layer.weight_packed.device
        backend, why = choose_backend(self.act_method, device, layer.params_dtype)
        layer.scalesweep_backend = backend
        log_backend(self.quant_config, backend, why)
        if self.act_method is not None:
            ga = layer.input_global_scale.detach().to(torch.float32)
            if not torch.isfinite(ga).all() or (ga <= 0).any():
                raise ValueError(f"scalesweep: {self.prefix}.input_global_scale is {ga.tolist()}")
            if torch.unique(ga).numel() != 1:
                logger.warning(
                    "scalesweep: %s: fused shards have different input_global_scale %s; "
                    "using the largest (as vLLM does)",
                    self.prefix,
                    ga.tolist(),
                )
            # Encode scale of the input (x * G_a before rounding), shared by the shards.
            layer.scalesweep_input_gs = ga.max().to(device)
        if self.has_input_scale and hasattr(layer, "input_global_scale"):
            del layer.input_global_scale
        vec = layer.scalesweep_input_weight
        if vec is not None:
            layer.scalesweep_input_weight = vec.to(device)
        if layer.scalesweep_backend == "cutlass":
            self._prepare_cutlass(layer, gw)
        elif layer.scalesweep_backend == "packed":
            self._prepare_packed(layer, gw)
        else:
            self._prepare_dequant(layer, gw)

    def _prepare_dequant(self, layer: torch.nn.Module, gw: torch.Tensor) -> None:
        """Decode once: each shard with its own global scale, so even a checkpoint
        whose fused partners disagree is reproduced exactly."""
        packed, scales = layer.weight_packed.data, layer.weight_scale.data
        ws2 = getattr(layer, "scalesweep_ws2", None)  # a ModelOpt export: its decode order
        parts, row = [], 0
        for i, width in enumerate(layer.logical_widths):
            rows = slice(row, row + width)
            if ws2 is not None:
                parts.append(
                    modelopt_dequantize(packed[rows], scales[rows], ws2[i], layer.params_dtype)
                )
            else:
                parts.append(
                    kernels.dequantize(packed[rows], scales[rows], gw[i], layer.params_dtype)
                )
            row += width
        weight = torch.cat(parts) if len(parts) > 1 else parts[0]
        del layer.weight_packed, layer.weight_scale, layer.weight_global_scale
        layer.weight = Parameter(weight.contiguous(), requires_grad=False)
        if current_platform.is_cpu():
            # vLLM's own CPU GEMM (oneDNN / sgl kernels): repacks and drops layer.weight.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        else:
            layer.cpu_linear = None

    def _prepare_packed(self, layer: torch.nn.Module, gw: torch.Tensor) -> None:
        """Repack for the C++ GEMM, one fp32 per output row: its shard's G_w (W4A16) or
        alpha = 1 / (G_a G_w) (W4A4, as vLLM computes the cutlass alpha), so fused
        shards keep their own global scales exactly."""
        widths = torch.tensor(layer.logical_widths)
        g_rows = gw.repeat_interleave(widths)
        ws2 = getattr(layer, "scalesweep_ws2", None)
        if self.act_method is None:
            rows = g_rows
        elif ws2 is not None:  # ModelOpt: vLLM's alpha = input_scale * weight_scale_2
            rows = layer.scalesweep_in_scale * ws2.repeat_interleave(widths)
        else:
            rows = 1.0 / (layer.scalesweep_input_gs.to(torch.float32) * g_rows)
        kind = "w4a16" if self.act_method is None else "w4a4"
        pw = cpu_gemm.pack(layer.weight_packed.data, layer.weight_scale.data, rows, kind)
        del layer.weight_packed, layer.weight_scale, layer.weight_global_scale
        # Parameters, so the engine (and anyone counting them) sees the weight's bytes.
        layer.scalesweep_codes = Parameter(pw.codes, requires_grad=False)
        layer.scalesweep_scales = Parameter(pw.scales, requires_grad=False)
        layer.scalesweep_rows = Parameter(pw.rows, requires_grad=False)
        # the kernels' view of the same tensors, built once rather than at every call
        layer.scalesweep_packed = cpu_gemm.PackedWeight(
            layer.scalesweep_codes, layer.scalesweep_scales, layer.scalesweep_rows, pw.n, pw.k
        )

    def _prepare_cutlass(self, layer: torch.nn.Module, gw: torch.Tensor) -> None:
        from vllm.model_executor.layers.quantization.utils.nvfp4_utils import (
            pad_nvfp4_weight_for_cutlass,
            swizzle_blockscale,
        )

        if torch.unique(gw).numel() != 1:
            logger.warning(
                "scalesweep: %s: fused shards have different weight_global_scale %s; the FP4 "
                "GEMM takes one, using the largest (as vLLM does)",
                self.prefix,
                gw.tolist(),
            )
        g_w = gw.max()
        packed, pad_bytes = pad_nvfp4_weight_for_cutlass(layer.weight_packed.data)
        layer.scalesweep_pad_bytes = pad_bytes
        layer.weight = Parameter(packed, requires_grad=False)
        layer.weight_scale = Parameter(
            swizzle_blockscale(layer.weight_scale.data), requires_grad=False
        )
        # cutlass computes alpha * sum(a_q * a_s * w_q * w_s); decode scales are 1/G.
        alpha = 1.0 / (layer.scalesweep_input_gs.to(torch.float32) * g_w.to(layer.weight.device))
        ws2 = getattr(layer, "scalesweep_ws2", None)
        if ws2 is not None:  # ModelOpt: vLLM's alpha = input_scale * weight_scale_2
            alpha = (layer.scalesweep_in_scale * ws2.max()).to(layer.weight.device)
        layer.scalesweep_alpha = alpha.reshape(()).to(torch.float32)
        del layer.weight_packed, layer.weight_global_scale

    # -- forward -------------------------------------------------------------------------
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.scalesweep_backend == "cutlass":
            return self._apply_cutlass(layer, x, bias)
        if layer.scalesweep_backend == "packed":
            return self._apply_packed(layer, x, bias)
        if self.act_method is not None:
            x = kernels.fake_quantize(
                x, layer.scalesweep_input_gs, self.act_method, layer.scalesweep_input_weight
            )
        if layer.cpu_linear is not None:
            return layer.cpu_linear(x, layer.weight, bias)
        return torch.nn.functional.linear(x, layer.weight, bias)

    def _apply_packed(self, layer, x, bias):
        pw = layer.scalesweep_packed
        if self.act_method is None:
            y = cpu_gemm.w4a16(x, pw)
        else:
            packed, scales = kernels.quantize(
                x, layer.scalesweep_input_gs, self.act_method, layer.scalesweep_input_weight
            )
            y = cpu_gemm.w4a4(packed, scales, pw)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype)

    def _apply_cutlass(self, layer, x, bias):
        from vllm._custom_ops import cutlass_scaled_fp4_mm

        from ..kernels.swizzle import quantize_swizzled

        shape = x.shape
        # Codes and the swizzled, zero-padded scales cutlass reads, in one extra pass
        # (kernels/swizzle.py), not vLLM's per-call swizzle_blockscale.
        packed, scales = quantize_swizzled(
            x.reshape(-1, shape[-1]),
            layer.scalesweep_input_gs,
            self.act_method,
            layer.scalesweep_input_weight,
            layer.scalesweep_pad_bytes,
        )
        out = cutlass_scaled_fp4_mm(
            packed,
            layer.weight,
            scales,
            layer.weight_scale,
            layer.scalesweep_alpha,
            x.dtype,
        )
        out = out[:, : layer.output_size_per_partition]
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], layer.output_size_per_partition)
