// NVFP4 GEMMs on the CPU with the weights kept packed (4.5 bits per weight): the
// arithmetic of scalesweep_vllm/gemm_reference.py, bit for bit, on every ISA build.
//
// Weight layout (repacked once at load by kernels/cpu_gemm.py): output channels in
// tiles of 16; for tile t and input feature k, 8 bytes hold the 16 codes, byte j the
// code of channel 16t + j (low nibble) and 16t + 8 + j (high nibble). So one 8-byte
// load decodes to one 16-lane vector over the tile's channels (AVX-512: one
// vpermps of a 16-entry table; AVX2: two 8-entry vpermps and the sign bit; generic:
// a table lookup per lane), and the GEMM runs as outer products: for each k,
// acc[m] += x[m, k] * w[k, 16 channels]. Scales: [tiles, K/16, 16] fp8 bytes.
//
// Summation order (what makes every build, every thread count and every batch
// size give the same bits, and what the reference reproduces):
//   W4A16: y[m, n] = (...((x[m,0] * w[n,0]) + x[m,1] * w[n,1]) + ...) in k order,
//          each product and sum rounded to fp32 (no fused multiply-add:
//          -ffp-contract=off), w = (fp8 scale / G_w[n]) * e2m1 exactly as the
//          dequantize kernel decodes it.
//   W4A4:  per 16-block b, I_b = sum_j (2 qa_j)(2 qw_j), an integer of magnitude
//          <= 16 * 144 = 2304, summed exactly in fp32 lanes (any order); the term
//          I_b * (sa_b * sw_b) is exact too (8 + 12 significant bits); the terms are
//          summed in block order in fp32, and y = (S * 0.25) * alpha[n], alpha =
//          1 / (G_a * G_w[n]). That is the FP4 tensor core's arithmetic (exact block
//          products, fp32 accumulation, alpha at the end), with the accumulation
//          order stated.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "nvfp4_gemm.h"

#define GEMM_INLINE inline __attribute__((always_inline))

namespace {

constexpr int BS = 16;  // NVFP4 block, and channels per tile
#if defined(__AVX512F__)
constexpr int NB = 64;
#elif defined(__AVX__)
constexpr int NB = 32;
#else
constexpr int NB = 16;
#endif
constexpr int PIECES = 64 / NB;
typedef float nf __attribute__((vector_size(NB)));
typedef float nfu __attribute__((vector_size(NB), aligned(4)));

// 16 fp32 lanes, one per channel of a tile.
struct V {
  nf p[PIECES];
};
GEMM_INLINE V zero() {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = nf{} ;
  return r;
}
GEMM_INLINE V load(const float* a) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = *reinterpret_cast<const nfu*>(a + i * (NB / 4));
  return r;
}
GEMM_INLINE void store(float* a, const V& v) {
  for (int i = 0; i < PIECES; ++i) *reinterpret_cast<nfu*>(a + i * (NB / 4)) = v.p[i];
}
GEMM_INLINE V mul(const V& a, const V& b) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = a.p[i] * b.p[i];
  return r;
}
GEMM_INLINE V mul(const V& a, float s) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = a.p[i] * s;
  return r;
}
// a + s * b, rounded twice (the product, then the sum)
GEMM_INLINE V add_mul(const V& a, float s, const V& b) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = a.p[i] + (s * b.p[i]);
  return r;
}
GEMM_INLINE V add_mul(const V& a, const V& s, const V& b) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = a.p[i] + (s.p[i] * b.p[i]);
  return r;
}
GEMM_INLINE V div(const V& a, const V& b) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = a.p[i] / b.p[i];
  return r;
}

// The 16 signed E2M1 values by code (bit 3 the sign) times 2: the integers 2q in
// [-12, 12]. Code 8 (-0) gives +0, which changes no sum: accumulators start at +0 and
// an fp32 sum is -0 only when both terms are. W4A16 multiplies them by (v / G) / 2,
// exact since v / G >= 2^-124 (G <= 2^115) stays normal when halved, so
// ((v / G) / 2) * 2q rounds the same real number as (v / G) * q.
struct Table {
  alignas(64) float v[16];
  Table() {
    const float unit = 2.0f;
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int c = 0; c < 16; ++c) v[c] = (c & 8 ? -mag[c & 7] : mag[c & 7]) * unit;
  }
};

// 8 bytes -> 16 lanes: lane j < 8 from byte j's low nibble, lane 8 + j from its high one.
GEMM_INLINE V decode(const uint8_t* p8, const Table& t) {
  V r;
#if defined(__AVX512F__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p8));
  __m512i w = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, b));
  w = _mm512_srlv_epi32(w, _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0));
  r.p[0] = (nf)_mm512_permutexvar_ps(w, _mm512_load_ps(t.v));  // low 4 bits index
#elif defined(__AVX2__)
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p8)));
  const __m256 mag = _mm256_load_ps(t.v);  // entries 0..7: the magnitudes (times unit)
  const __m256i sign = _mm256_set1_epi32(int32_t(0x80000000u));
  // vpermps reads the low 3 bits of each index; the code's bit 3 is the sign
  const __m256 lo = _mm256_permutevar8x32_ps(mag, w);
  const __m256i ls = _mm256_and_si256(_mm256_slli_epi32(w, 28), sign);
  const __m256i hw = _mm256_srli_epi32(w, 4);
  const __m256 hi = _mm256_permutevar8x32_ps(mag, hw);
  const __m256i hs = _mm256_and_si256(_mm256_slli_epi32(w, 24), sign);
  r.p[0] = (nf)_mm256_xor_ps(lo, _mm256_castsi256_ps(ls));
  r.p[1] = (nf)_mm256_xor_ps(hi, _mm256_castsi256_ps(hs));
#else
  alignas(64) float f[BS];
  for (int j = 0; j < 8; ++j) {
    f[j] = t.v[p8[j] & 15];
    f[8 + j] = t.v[p8[j] >> 4];
  }
  r = load(f);
#endif
  return r;
}

// Four consecutive input features (32 bytes) -> four 16-lane vectors. With AVX2 the
// codes become the integers 2q by two byte shuffles (vpshufb, a 16-entry table) for
// all 64 lanes at once, then widen to fp32: 7 instructions per feature instead of
// decode()'s 10.
GEMM_INLINE void decode4(const uint8_t* p32, const Table& t, V q[4]) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256i tab = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                       0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p32));
  const __m256i lo = _mm256_shuffle_epi8(tab, _mm256_and_si256(b, low4));
  const __m256i hi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
  const __m128i l[2] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)};
  const __m128i h[2] = {_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
  for (int j = 0; j < 4; ++j) {
    const __m128i lj = (j & 1) ? _mm_unpackhi_epi64(l[j >> 1], l[j >> 1]) : l[j >> 1];
    const __m128i hj = (j & 1) ? _mm_unpackhi_epi64(h[j >> 1], h[j >> 1]) : h[j >> 1];
    q[j].p[0] = (nf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lj));
    q[j].p[1] = (nf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hj));
  }
  (void)t;
#else
  for (int j = 0; j < 4; ++j) q[j] = decode(p32 + 8 * j, t);
#endif
}

// 16 fp8 e4m3 bytes -> fp32, exactly (the caller rejects the NaN codes 0x7f / 0xff).
// Vector builds compute it from the bits (a table lookup per lane would go through
// memory: 16 scalar stores, then a vector load that cannot forward them): a normal
// code's exponent and mantissa move into fp32's fields with the bias 127 - 7 added;
// a subnormal one (exponent 0) is m * 2^-9; the sign bit moves to bit 31.
GEMM_INLINE V fp8_values(const uint8_t* s, const float* fp8) {
  V r;
#if defined(__AVX2__) || defined(__AVX512F__)
  typedef int32_t ni __attribute__((vector_size(NB)));
  for (int i = 0; i < PIECES; ++i) {
#if defined(__AVX512F__)
    const ni b = (ni)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#else
    const ni b = (ni)_mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i * 8)));
#endif
    const ni normal = ((b & 0x7F) << 20) + (120 << 23);
    const nf sub = __builtin_convertvector(b & 7, nf) * (1.0f / 512.0f);
    const ni mag = ((b & 0x78) == 0) ? (ni)sub : normal;
    r.p[i] = (nf)(mag | ((b & 0x80) << 24));
  }
  (void)fp8;
#else
  alignas(64) float f[BS];
  for (int j = 0; j < BS; ++j) f[j] = fp8[s[j]];
  r = load(f);
#endif
  return r;
}

struct Packed {
  const uint8_t* codes;   // [T, K, 8]
  const uint8_t* scales;  // [T, K/16, 16]
  int64_t K;
};

// The tile's weights for input features [0, K) in fp32 lanes, w = (v / G) * e2m1 (W4A16)
// or the integers 2q (W4A4, g == nullptr), into out [K, 16].
void decode_tile(const Packed& pw, int64_t t, const V* ginv, const float* fp8, const Table& tab,
                 float* out) {
  const int64_t nb = pw.K / BS;
  const uint8_t* c = pw.codes + t * pw.K * 8;
  const uint8_t* s = pw.scales + t * nb * BS;
  for (int64_t b = 0; b < nb; ++b) {
    const V f = ginv ? mul(div(fp8_values(s + b * BS, fp8), *ginv), 0.5f) : V{};
    for (int kk = 0; kk < BS; kk += 4) {
      const int64_t k = b * BS + kk;
      V q[4];
      decode4(c + k * 8, tab, q);
      for (int j = 0; j < 4; ++j) store(out + (k + j) * BS, ginv ? mul(f, q[j]) : q[j]);
    }
  }
}

// W4A16, MR rows of x (row stride K) against one tile; w from `scratch` [K, 16] when
// given, else decoded here. y rows: MR x 16 floats at y + r * ystride.
template <int MR>
void w4a16_rows(const float* x, int64_t K, const Packed& pw, int64_t t, const V& g,
                const float* fp8, const Table& tab, const float* scratch, float* y,
                int64_t ystride) {
  V acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = zero();
  const int64_t nb = K / BS;
  const uint8_t* c = pw.codes + t * K * 8;
  const uint8_t* s = pw.scales + t * nb * BS;
  for (int64_t b = 0; b < nb; ++b) {
    V f;  // (v / G) / 2, see Table
    if (!scratch) f = mul(div(fp8_values(s + b * BS, fp8), g), 0.5f);
    for (int kk = 0; kk < BS; kk += 4) {
      const int64_t k = b * BS + kk;
      V q[4];
      if (!scratch) decode4(c + k * 8, tab, q);
      for (int j = 0; j < 4; ++j) {
        const V w = scratch ? load(scratch + (k + j) * BS) : mul(f, q[j]);
        for (int r = 0; r < MR; ++r) acc[r] = add_mul(acc[r], x[r * K + k + j], w);
      }
    }
  }
  for (int r = 0; r < MR; ++r) store(y + r * ystride, acc[r]);
}

// W4A4, MR rows of xa (the integers 2qa, row stride K) with block scales sa (fp32,
// row stride K/16) against one tile.
template <int MR>
void w4a4_rows(const float* xa, const float* sa, int64_t K, const Packed& pw, int64_t t,
               const V& alpha, const float* fp8, const Table& tab, const float* scratch, float* y,
               int64_t ystride) {
  V acc[MR], blk[MR];
  for (int r = 0; r < MR; ++r) acc[r] = zero();
  const int64_t nb = K / BS;
  const uint8_t* c = pw.codes + t * K * 8;
  const uint8_t* s = pw.scales + t * nb * BS;
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < MR; ++r) blk[r] = zero();
    for (int kk = 0; kk < BS; kk += 4) {
      const int64_t k = b * BS + kk;
      V q[4];
      if (!scratch) decode4(c + k * 8, tab, q);
      for (int j = 0; j < 4; ++j) {
        const V w = scratch ? load(scratch + (k + j) * BS) : q[j];
        for (int r = 0; r < MR; ++r) blk[r] = add_mul(blk[r], xa[r * K + k + j], w);  // exact
      }
    }
    const V sw = fp8_values(s + b * BS, fp8);
    for (int r = 0; r < MR; ++r) acc[r] = add_mul(acc[r], mul(sw, sa[r * nb + b]), blk[r]);
  }
  for (int r = 0; r < MR; ++r) store(y + r * ystride, mul(mul(acc[r], 0.25f), alpha));
}

constexpr int MR = 4;      // rows of x per register tile
constexpr int SCRATCH_M = MR;  // above this many rows, decode the tile once into scratch

template <typename RowsFn>
void for_tiles(int64_t M, int64_t N, int64_t T, int64_t K, torch::Tensor& out, bool use_scratch,
               RowsFn rows) {
  float* yp = out.data_ptr<float>();
  // a thread's share should be worth waking it: ~64k multiply-adds
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * BS));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(use_scratch ? K * BS : 0);
    alignas(64) float ybuf[MR * BS];
    for (int64_t t = t0; t < t1; ++t) {
      const float* sc = use_scratch ? scratch.data() : nullptr;
      rows(-1, 0, t, scratch.data(), ybuf);  // m0 = -1: prepare the tile (scratch)
      const int64_t n0 = t * BS, nv = std::min<int64_t>(BS, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = int(std::min<int64_t>(MR, M - m0));
        rows(m0, mr, t, sc, ybuf);
        for (int r = 0; r < mr; ++r)
          std::memcpy(yp + (m0 + r) * N + n0, ybuf + r * BS, nv * sizeof(float));
      }
    }
  });
}

void check_packed(const torch::Tensor& codes, const torch::Tensor& scales, int64_t K,
                  int64_t N) {
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == torch::kUInt8 && codes.dim() == 3 &&
                  codes.size(1) == K && codes.size(2) == 8,
              "codes: contiguous uint8 [tiles, K, 8]");
  const int64_t T = codes.size(0);
  TORCH_CHECK(T * BS >= N && (T - 1) * BS < N, "codes: ", T, " tiles for ", N, " channels");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kUInt8 &&
                  scales.dim() == 3 && scales.size(0) == T && scales.size(1) == K / BS &&
                  scales.size(2) == BS,
              "scales: contiguous uint8 [tiles, K/16, 16]");
}

const float* fp8_table(const torch::Tensor& table) {
  TORCH_CHECK(table.scalar_type() == torch::kFloat32 && table.numel() == 256 &&
                  table.is_contiguous(),
              "table: fp32 [256]");
  return table.data_ptr<float>();
}

}  // namespace

torch::Tensor nvfp4_gemm_w4a16_cpu(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                                   torch::Tensor g_rows, int64_t N, torch::Tensor table) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % BS == 0 && K > 0, "K must be a positive multiple of 16");
  check_packed(codes, scales, K, N);
  const int64_t T = codes.size(0);
  TORCH_CHECK(g_rows.is_contiguous() && g_rows.scalar_type() == torch::kFloat32 &&
                  g_rows.numel() == T * BS,
              "g_rows: fp32 [tiles * 16]");
  const float* fp8 = fp8_table(table);
  torch::Tensor out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const Packed pw{codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), K};
  const float* xp = x.data_ptr<float>();
  const float* gp = g_rows.data_ptr<float>();
  const Table tab;
  const bool scratch = M > SCRATCH_M;
  for_tiles(M, N, T, K, out, scratch, [&](int64_t m0, int mr, int64_t t, const float* sc,
                                          float* y) {
    const V g = load(gp + t * BS);
    if (m0 < 0) {
      if (scratch) decode_tile(pw, t, &g, fp8, tab, const_cast<float*>(sc));
      return;
    }
    const float* xr = xp + m0 * K;
    switch (mr) {
      case 4: w4a16_rows<4>(xr, K, pw, t, g, fp8, tab, sc, y, BS); break;
      case 3: w4a16_rows<3>(xr, K, pw, t, g, fp8, tab, sc, y, BS); break;
      case 2: w4a16_rows<2>(xr, K, pw, t, g, fp8, tab, sc, y, BS); break;
      default: w4a16_rows<1>(xr, K, pw, t, g, fp8, tab, sc, y, BS); break;
    }
  });
  return out;
}

torch::Tensor nvfp4_gemm_w4a4_cpu(torch::Tensor xcodes, torch::Tensor xscales,
                                  torch::Tensor codes, torch::Tensor scales,
                                  torch::Tensor alpha_rows, int64_t N, torch::Tensor table) {
  TORCH_CHECK(xcodes.is_contiguous() && xcodes.scalar_type() == torch::kUInt8 &&
                  xcodes.dim() == 2,
              "x codes: contiguous uint8 [M, K/2]");
  const int64_t M = xcodes.size(0), K = xcodes.size(1) * 2, nb = K / BS;
  TORCH_CHECK(K % BS == 0 && K > 0, "K must be a positive multiple of 16");
  TORCH_CHECK(xscales.is_contiguous() && xscales.scalar_type() == torch::kUInt8 &&
                  xscales.dim() == 2 && xscales.size(0) == M && xscales.size(1) == nb,
              "x scales: contiguous uint8 [M, K/16]");
  check_packed(codes, scales, K, N);
  const int64_t T = codes.size(0);
  TORCH_CHECK(alpha_rows.is_contiguous() && alpha_rows.scalar_type() == torch::kFloat32 &&
                  alpha_rows.numel() == T * BS,
              "alpha_rows: fp32 [tiles * 16]");
  const float* fp8 = fp8_table(table);
  torch::Tensor out = torch::empty({M, N}, alpha_rows.options());
  if (M == 0 || N == 0) return out;
  // the activation's integers 2qa (checkpoint order: byte i = elements 2i, 2i + 1)
  // and block scales as fp32, once per call
  const Table tab;
  std::vector<float> xa(M * K), sa(M * nb);
  const uint8_t* xc = xcodes.data_ptr<uint8_t>();
  const uint8_t* xs = xscales.data_ptr<uint8_t>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < K / 2; ++i) {
        const uint8_t byte = xc[r * (K / 2) + i];
        xa[r * K + 2 * i] = tab.v[byte & 15];
        xa[r * K + 2 * i + 1] = tab.v[byte >> 4];
      }
      for (int64_t b = 0; b < nb; ++b) sa[r * nb + b] = fp8[xs[r * nb + b]];
    }
  });
  const Packed pw{codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), K};
  const float* ap = alpha_rows.data_ptr<float>();
  const bool scratch = M > SCRATCH_M;
  for_tiles(M, N, T, K, out, scratch, [&](int64_t m0, int mr, int64_t t, const float* sc,
                                          float* y) {
    if (m0 < 0) {
      if (scratch) decode_tile(pw, t, nullptr, fp8, tab, const_cast<float*>(sc));
      return;
    }
    const V alpha = load(ap + t * BS);
    const float* xr = xa.data() + m0 * K;
    const float* sr = sa.data() + m0 * nb;
    switch (mr) {
      case 4: w4a4_rows<4>(xr, sr, K, pw, t, alpha, fp8, tab, sc, y, BS); break;
      case 3: w4a4_rows<3>(xr, sr, K, pw, t, alpha, fp8, tab, sc, y, BS); break;
      case 2: w4a4_rows<2>(xr, sr, K, pw, t, alpha, fp8, tab, sc, y, BS); break;
      default: w4a4_rows<1>(xr, sr, K, pw, t, alpha, fp8, tab, sc, y, BS); break;
    }
  });
  return out;
}
