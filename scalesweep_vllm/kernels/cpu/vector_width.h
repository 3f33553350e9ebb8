// The native vector width of a build, shared by the quantizer (nvfp4_cpu.cpp) and the
// GEMMs (nvfp4_gemm.cpp): sixteen fp32 lanes are held as PIECES native vectors of NB
// bytes (one zmm with AVX-512, two ymm with AVX/AVX2, four xmm with SSE2 or NEON).
#pragma once
#include <cstdint>

namespace {
#if defined(__AVX512F__)
constexpr int NB = 64;
#elif defined(__AVX__)
constexpr int NB = 32;
#else
constexpr int NB = 16;  // SSE2, NEON
#endif
constexpr int PIECES = 64 / NB;
typedef float nf __attribute__((vector_size(NB)));
typedef int32_t ni __attribute__((vector_size(NB)));
}  // namespace
