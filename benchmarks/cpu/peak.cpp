// The benchmark's vector peak (benchmarks/bench_cpu_quant.py): a simple vectorised
// fp32 loop, 16 independent chains of a multiply and an add per step (enough to hide
// latency), one thread, built with the flags of the backend level it is compared with.
// Kept out of the production extension: benchmark code must not be able to break it.
#include <torch/extension.h>

#include "../../scalesweep_vllm/kernels/cpu/vector_width.h"  // NB, nf: the backend's width

namespace {
typedef nf vf;  // the hardware's width
constexpr int C = 12;  // independent chains: enough to hide latency, few enough for registers
}  // namespace

double peak_loop(int64_t steps) {
  vf acc[C];
  for (int i = 0; i < C; ++i) acc[i] = vf{} + (1.0f + i * 1e-3f);
  const vf a = vf{} + 0.999999f, b = vf{} + 1e-7f;
  for (int64_t s = 0; s < steps; ++s)
    for (int i = 0; i < C; ++i) acc[i] = acc[i] * a + b;
  float sink = 0.0f;
  for (int i = 0; i < C; ++i) sink += acc[i][0];
  volatile float keep = sink;
  (void)keep;
  return double(steps) * C * 2 * (NB / 4);  // lane-operations
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("peak_loop", &peak_loop, "fp32 lane-ops of a simple loop"); }
