// NVFP4 GEMMs on the CPU with the weights kept packed (4.5 bits per weight): the
// arithmetic of scalesweep_vllm/gemm_reference.py, bit for bit, on every ISA build.
//
// Weight layout (repacked once at load by kernels/cpu_gemm.py): output channels in
// tiles of 16, input features in groups of 4; a group's 64 codes (4 features x 16
// channels) in 32 bytes, the code of feature kj (0..3) and channel c (0..15) in byte
// 16 * ((c % 8) / 4) + 4 * kj + c % 4, low nibble for c < 8, high for c >= 8. That
// order is what AVX2's in-lane byte and word interleaves produce, so a group decodes
// in 20 instructions straight to fp32 (decode4); every build reads the same layout.
// The GEMM runs as outer products: for each k, P[m] += x[m, k] * 2q[k, 16 channels].
// Scales: [tiles, K/16, 16] fp8 bytes.
//
// Arithmetic (what makes every build, every thread count and every batch size give
// the same bits, and what the reference reproduces). fma(a, b, c) is the fused
// multiply-add, one rounding (FMA3 / AVX-512 instructions; the generic build calls
// fmaf, correctly rounded too, slowly). 2q are the E2M1 codes as integers in [-12, 12].
//   Block partials, both GEMMs: P_b = fma(x_15, 2q_15, ... fma(x_0, 2q_0, +0)) over the
//   block's 16 inputs in order.
//   W4A16: y[m, n] = fma(h_B, P_B, ... fma(h_0, P_0, +0)) in block order, with
//          h_b = (v_b / G_w[n]) * 0.5 (v_b the fp8 block scale; the halving is exact:
//          v / G >= 2^-124 for G <= 2^115 stays normal).
//   W4A4:  x are the activation's integers 2qa, so P_b = sum (2qa)(2qw) is an exact
//          integer (|P_b| <= 2304) and sa_b * sw_b * P_b is exact too (8 + 12
//          significant bits): the block terms are the FP4 tensor core's exact
//          products. y = (S * 0.25) * alpha[n], S = fma(sa_b * sw_b, P_b, ...) summed in
//          block order (one rounding per block, as an fp32 add of the exact term),
//          alpha = 1 / (G_a * G_w[n]).
// The reference (gemm_reference.py) computes the same with an exact emulation of fp32
// FMA in float64.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "nvfp4_gemm.h"
#include "vector_width.h"

#define GEMM_INLINE inline __attribute__((always_inline))

namespace {

constexpr int BS = 16;  // NVFP4 block, and channels per tile
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
// fma(s, b, a) = s * b + a with one rounding, lane by lane.
GEMM_INLINE nf fma_piece(nf s, nf b, nf a) {
#if defined(__AVX512F__)
  return (nf)_mm512_fmadd_ps((__m512)s, (__m512)b, (__m512)a);
#elif defined(__FMA__)
  return (nf)_mm256_fmadd_ps((__m256)s, (__m256)b, (__m256)a);
#else
  nf r;
  for (int i = 0; i < NB / 4; ++i) r[i] = __builtin_fmaf(s[i], b[i], a[i]);
  return r;
#endif
}
GEMM_INLINE V fma(float s, const V& b, const V& a) {
  V r;
  const nf sv = nf{} + s;
  for (int i = 0; i < PIECES; ++i) r.p[i] = fma_piece(sv, b.p[i], a.p[i]);
  return r;
}
GEMM_INLINE V fma(const V& s, const V& b, const V& a) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = fma_piece(s.p[i], b.p[i], a.p[i]);
  return r;
}
GEMM_INLINE V div(const V& a, const V& b) {
  V r;
  for (int i = 0; i < PIECES; ++i) r.p[i] = a.p[i] / b.p[i];
  return r;
}

// The 16 signed E2M1 values by code (bit 3 the sign) times 2: the integers 2q in
// [-12, 12]. Code 8 (-0) gives +0, which changes no sum: partials and accumulators
// start at +0, and an fp32 sum is -0 only when both terms are.
struct Table {
  alignas(64) float v[16];
  Table() {
    const float unit = 2.0f;
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int c = 0; c < 16; ++c) v[c] = (c & 8 ? -mag[c & 7] : mag[c & 7]) * unit;
  }
};

// One group (32 bytes, see the layout) -> four 16-lane vectors of the integers 2q, one
// per input feature. AVX2: two byte shuffles (vpshufb, 16-entry tables) give the high
// and low byte of each value's bf16 bit pattern (the values 2q are bf16-exact, their
// low 16 fp32 bits zero), byte and word interleaves with zero make them fp32: 20
// instructions for 64 values, no integer-to-float conversion.
GEMM_INLINE void decode4(const uint8_t* p32, const Table& t, V q[4]) {
#if defined(__AVX2__)
  const __m256i thi = _mm256_setr_epi8(
      0x00, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x41, 0x41, 0x00, char(0xBF), char(0xC0), char(0xC0),
      char(0xC0), char(0xC0), char(0xC1), char(0xC1), 0x00, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x41,
      0x41, 0x00, char(0xBF), char(0xC0), char(0xC0), char(0xC0), char(0xC0), char(0xC1),
      char(0xC1));
  const __m256i tlo = _mm256_setr_epi8(
      0x00, char(0x80), 0x00, 0x40, char(0x80), char(0xC0), 0x00, 0x40, 0x00, char(0x80), 0x00,
      0x40, char(0x80), char(0xC0), 0x00, 0x40, 0x00, char(0x80), 0x00, 0x40, char(0x80),
      char(0xC0), 0x00, 0x40, 0x00, char(0x80), 0x00, 0x40, char(0x80), char(0xC0), 0x00, 0x40);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p32));
  __m256 out[2][4];
  for (int h = 0; h < 2; ++h) {  // h = 0: channels 0..7 (low nibbles), 1: 8..15
    const __m256i n = h ? _mm256_and_si256(_mm256_srli_epi16(b, 4), low4)
                        : _mm256_and_si256(b, low4);
    const __m256i hi = _mm256_shuffle_epi8(thi, n), lo = _mm256_shuffle_epi8(tlo, n);
    const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
    out[h][0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w0));
    out[h][1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w0));
    out[h][2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w1));
    out[h][3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w1));
  }
  for (int j = 0; j < 4; ++j) {
#if defined(__AVX512F__)
    q[j].p[0] = (nf)_mm512_insertf32x8(_mm512_castps256_ps512(out[0][j]), out[1][j], 1);
#else
    q[j].p[0] = (nf)out[0][j];
    q[j].p[1] = (nf)out[1][j];
#endif
  }
  (void)t;
#else
  for (int j = 0; j < 4; ++j) {
    alignas(64) float f[BS];
    for (int c = 0; c < BS; ++c) {
      const uint8_t byte = p32[16 * ((c % 8) / 4) + 4 * j + c % 4];
      f[c] = t.v[c < 8 ? byte & 15 : byte >> 4];
    }
    q[j] = load(f);
  }
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

// The tile's codes as the integers 2q in fp32 lanes, into out [K, 16] (the scratch of
// the M > MR path: decoded once per tile, read by every group of MR rows).
void decode_tile(const Packed& pw, int64_t t, const Table& tab, float* out) {
  const uint8_t* c = pw.codes + t * pw.K * 8;
  for (int64_t k = 0; k < pw.K; k += 4) {
    V q[4];
    decode4(c + k * 8, tab, q);
    for (int j = 0; j < 4; ++j) store(out + (k + j) * BS, q[j]);
  }
}

// MR rows of x (row stride K) against TT consecutive tiles t0.. : the block partials
// P_b, then per block acc = fma(h, P_b, acc) with h = (v / G) / 2 (W4A16, `g` the rows'
// G_w) or h = sw * sa (W4A4, sa the rows' activation block scales, `g` alpha). Codes
// from `scratch` [K, 16] when given (TT = 1), else decoded here. Each (row, tile) is an
// independent chain of dependent fused multiply-adds: with one row, TT = 4 tiles keep
// enough of them in flight to hide the instruction's latency. Output [TT][MR][16] at y.
template <int MR, int TT, bool W4A4, bool SCRATCH>
void tile_rows(const float* x, const float* sa, int64_t K, const Packed& pw, int64_t t0,
               const V* g, const float* fp8, const Table& tab, const float* scratch, float* y) {
  V acc[TT][MR], part[TT][MR];
  for (int u = 0; u < TT; ++u)
    for (int r = 0; r < MR; ++r) acc[u][r] = zero();
  const int64_t nb = K / BS;
  for (int64_t b = 0; b < nb; ++b) {
    for (int u = 0; u < TT; ++u)
      for (int r = 0; r < MR; ++r) part[u][r] = zero();
    for (int kk = 0; kk < BS; kk += 4) {
      const int64_t k = b * BS + kk;
      for (int u = 0; u < TT; ++u) {
        V q[4];
        if (SCRATCH) {  // a compile-time branch: the decoder's constants stay out of it
          for (int j = 0; j < 4; ++j) q[j] = load(scratch + (k + j) * BS);
        } else {
          decode4(pw.codes + ((t0 + u) * K + k) * 8, tab, q);
        }
        for (int j = 0; j < 4; ++j)
          for (int r = 0; r < MR; ++r) part[u][r] = fma(x[r * K + k + j], q[j], part[u][r]);
      }
    }
    for (int u = 0; u < TT; ++u) {
      const V v = fp8_values(pw.scales + ((t0 + u) * nb + b) * BS, fp8);
      if (W4A4) {
        for (int r = 0; r < MR; ++r) acc[u][r] = fma(mul(v, sa[r * nb + b]), part[u][r], acc[u][r]);
      } else {
        const V h = mul(div(v, g[u]), 0.5f);
        for (int r = 0; r < MR; ++r) acc[u][r] = fma(h, part[u][r], acc[u][r]);
      }
    }
  }
  for (int u = 0; u < TT; ++u)
    for (int r = 0; r < MR; ++r)
      store(y + (u * MR + r) * BS, W4A4 ? mul(mul(acc[u][r], 0.25f), g[u]) : acc[u][r]);
}

// tile_rows for one tile and mr (1..4) rows, the row count made a template argument.
template <bool W4A4, bool SCRATCH>
void rows_of_tile(int mr, const float* x, const float* sa, int64_t K, const Packed& pw,
                  int64_t t, const V* g, const float* fp8, const Table& tab,
                  const float* scratch, float* y) {
  switch (mr) {
    case 4: tile_rows<4, 1, W4A4, SCRATCH>(x, sa, K, pw, t, g, fp8, tab, scratch, y); break;
    case 3: tile_rows<3, 1, W4A4, SCRATCH>(x, sa, K, pw, t, g, fp8, tab, scratch, y); break;
    case 2: tile_rows<2, 1, W4A4, SCRATCH>(x, sa, K, pw, t, g, fp8, tab, scratch, y); break;
    default: tile_rows<1, 1, W4A4, SCRATCH>(x, sa, K, pw, t, g, fp8, tab, scratch, y); break;
  }
}

constexpr int MR = 4;      // rows of x per register tile
constexpr int SCRATCH_M = MR;  // above this many rows, decode the tile once into scratch

// All tiles (in parallel) times all rows of x, MR rows at a time. `rows` is fp32
// [tiles * 16]: G_w (W4A16) or alpha (W4A4) per output channel.
template <bool W4A4>
void run_tiles(int64_t M, int64_t N, int64_t T, int64_t K, torch::Tensor& out, const Packed& pw,
               const float* x, const float* sa, const float* rows, const float* fp8,
               const Table& tab) {
  float* yp = out.data_ptr<float>();
  const int64_t nb = K / BS;
  const bool use_scratch = M > SCRATCH_M;
  const int tt = M <= 2 ? 2 : 1;  // tiles per call (see tile_rows)
  const int64_t groups = (T + tt - 1) / tt;
  // a thread's share should be worth waking it: ~64k multiply-adds
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * BS * tt));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<float> scratch(use_scratch ? K * BS : 0);
    const float* sc = use_scratch ? scratch.data() : nullptr;
    alignas(64) float ybuf[4 * MR * BS];
    V g[4];
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t t0 = grp * tt;
      const int full = int(std::min<int64_t>(tt, T - t0));
      if (full == tt && tt > 1) {  // one or two rows, several tiles at once
        for (int u = 0; u < tt; ++u) g[u] = load(rows + (t0 + u) * BS);
        if (M == 1) {
          tile_rows<1, 2, W4A4, false>(x, sa, K, pw, t0, g, fp8, tab, nullptr, ybuf);
        } else {
          tile_rows<2, 2, W4A4, false>(x, sa, K, pw, t0, g, fp8, tab, nullptr, ybuf);
        }
        const int mr = int(M);
        for (int u = 0; u < tt; ++u) {
          const int64_t n0 = (t0 + u) * BS, nv = std::min<int64_t>(BS, N - n0);
          for (int r = 0; r < mr; ++r)
            std::memcpy(yp + r * N + n0, ybuf + (u * mr + r) * BS, nv * sizeof(float));
        }
        continue;
      }
      for (int64_t t = t0; t < t0 + full; ++t) {
        if (use_scratch) decode_tile(pw, t, tab, scratch.data());
        g[0] = load(rows + t * BS);
        const int64_t n0 = t * BS, nv = std::min<int64_t>(BS, N - n0);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int mr = int(std::min<int64_t>(MR, M - m0));
          const float* xr = x + m0 * K;
          const float* sr = W4A4 ? sa + m0 * nb : nullptr;
          if (use_scratch) {
            rows_of_tile<W4A4, true>(mr, xr, sr, K, pw, t, g, fp8, tab, sc, ybuf);
          } else {
            rows_of_tile<W4A4, false>(mr, xr, sr, K, pw, t, g, fp8, tab, sc, ybuf);
          }
          for (int r = 0; r < mr; ++r)
            std::memcpy(yp + (m0 + r) * N + n0, ybuf + r * BS, nv * sizeof(float));
        }
      }
    }
  });
}

// The packed weight, its per-row fp32 tensor (G_w or alpha) and K against each other.
void check_packed(const torch::Tensor& codes, const torch::Tensor& scales,
                  const torch::Tensor& rows, int64_t K, int64_t N) {
  TORCH_CHECK(K % BS == 0 && K > 0, "K must be a positive multiple of 16");
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == torch::kUInt8 && codes.dim() == 3 &&
                  codes.size(1) == K && codes.size(2) == 8,
              "codes: contiguous uint8 [tiles, K, 8]");
  const int64_t T = codes.size(0);
  TORCH_CHECK(T * BS >= N && (T - 1) * BS < N, "codes: ", T, " tiles for ", N, " channels");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kUInt8 &&
                  scales.dim() == 3 && scales.size(0) == T && scales.size(1) == K / BS &&
                  scales.size(2) == BS,
              "scales: contiguous uint8 [tiles, K/16, 16]");
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == torch::kFloat32 &&
                  rows.numel() == T * BS,
              "rows (G_w or alpha): fp32 [tiles * 16]");
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
  check_packed(codes, scales, g_rows, K, N);
  const int64_t T = codes.size(0);
  const float* fp8 = fp8_table(table);
  torch::Tensor out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const Packed pw{codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), K};
  const float* xp = x.data_ptr<float>();
  const float* gp = g_rows.data_ptr<float>();
  const Table tab;
  run_tiles<false>(M, N, T, K, out, pw, xp, nullptr, gp, fp8, tab);
  return out;
}

torch::Tensor nvfp4_gemm_w4a4_cpu(torch::Tensor xcodes, torch::Tensor xscales,
                                  torch::Tensor codes, torch::Tensor scales,
                                  torch::Tensor alpha_rows, int64_t N, torch::Tensor table) {
  TORCH_CHECK(xcodes.is_contiguous() && xcodes.scalar_type() == torch::kUInt8 &&
                  xcodes.dim() == 2,
              "x codes: contiguous uint8 [M, K/2]");
  const int64_t M = xcodes.size(0), K = xcodes.size(1) * 2, nb = K / BS;
  check_packed(codes, scales, alpha_rows, K, N);
  TORCH_CHECK(xscales.is_contiguous() && xscales.scalar_type() == torch::kUInt8 &&
                  xscales.dim() == 2 && xscales.size(0) == M && xscales.size(1) == nb,
              "x scales: contiguous uint8 [M, K/16]");
  const int64_t T = codes.size(0);
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
  run_tiles<true>(M, N, T, K, out, pw, xa.data(), sa.data(), alpha_rows.data_ptr<float>(), fp8,
                  tab);
  return out;
}
