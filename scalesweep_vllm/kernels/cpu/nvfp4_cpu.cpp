// NVFP4 AbsMax / ScaleSweep (MSE, WMSE, block Hessian) on the CPU, and the evaluation's
// four-over-six baseline, bit-exact with the torch
// reference (scalesweep_vllm/sweep.py): the same fp32 operations in the same
// order, compiled with -ffp-contract=off (no fused multiply-add) and without
// fast-math, so every product, quotient and sum rounds as torch's do.
//
// Layout: 16 blocks of 16 elements form a tile. The sweep runs with one block per
// vector lane (16 lanes of fp32), so the reference's pairwise tree sum over a
// block's 16 terms is 15 vertical vector adds and every candidate costs about a
// dozen vector operations per 16 elements. Encoding and decoding run in the natural
// layout (one block per vector, one element per lane).
//
// Candidate windows. Stage 1 sweeps [max(c0 - 3, 1), hi] (c0 the AbsMax code, hi
// sweep.py's proven upper bound); stage 2 sweeps [clip(E(best)), lo1 - 1] where
// that is not empty (rare), clip(E) being sweep.py's proven clipping bound: no code
// below it can tie or beat error E. Every code of the reference's windows (MSE:
// its two stages; WMSE: [min(clip(E(c0)), c0), hi]) that this does not sweep lies
// below clip(E(best)) and is strictly worse than best, and this sweeps no code
// above hi; so both return the same code, the smallest of least error (the
// exhaustive answer). tests/test_kernels_cpu.py checks codes, scales and values
// bit for bit.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "nvfp4_gemm.h"
#include "vector_width.h"

// The vector helpers are small and take 64-byte structs: a call passes them through
// memory, so they are always inlined.
#define ALWAYS_INLINE inline __attribute__((always_inline))
// GCC 12 for aarch64 gives up register allocation (an internal compiler error,
// "maximum number of generated reload insns") when the whole tile loop is one
// function of 64-byte vectors; there the tile's stages are separate calls.
#if defined(__aarch64__)
#define OUTLINE __attribute__((noinline))
#else
#define OUTLINE ALWAYS_INLINE
#endif

namespace {

// Sixteen lanes (one NVFP4 block, or one lane per block of a tile) held as PIECES
// native vectors of NB bytes. Why not GCC's 64-byte vector types directly: where the
// hardware's vectors are narrower (AVX2, SSE2, NEON), GCC 12 lowers their comparisons,
// selects and shuffles lane by lane in scalar code and moves them through the stack
// (seen on AVX2: AbsMax at 2% of a copy's bandwidth). Every operation below is the
// native one applied piece by piece; with AVX-512 there is one piece (NB, PIECES, nf,
// ni: vector_width.h).
constexpr int NL = NB / 4;  // lanes per piece
typedef uint32_t nu __attribute__((vector_size(NB)));
typedef uint16_t nh __attribute__((vector_size(NB / 2)));

template <typename E, typename N>
struct Vec {
  N p[PIECES];
  E operator[](int j) const { return p[j / NL][j % NL]; }
};
using vf = Vec<float, nf>;
using vi = Vec<int32_t, ni>;
using vu = Vec<uint32_t, nu>;
template <typename E>
using Scalar = std::type_identity_t<E>;

#define SCALESWEEP_BINARY(op)                                                    \
  template <typename E, typename N>                                              \
  ALWAYS_INLINE Vec<E, N> operator op(const Vec<E, N>& a, const Vec<E, N>& b) {          \
    Vec<E, N> r;                                                                 \
    for (int k = 0; k < PIECES; ++k) r.p[k] = a.p[k] op b.p[k];                  \
    return r;                                                                    \
  }                                                                              \
  template <typename E, typename N>                                              \
  ALWAYS_INLINE Vec<E, N> operator op(const Vec<E, N>& a, Scalar<E> s) {                 \
    Vec<E, N> r;                                                                 \
    for (int k = 0; k < PIECES; ++k) r.p[k] = a.p[k] op s;                       \
    return r;                                                                    \
  }                                                                              \
  template <typename E, typename N>                                              \
  ALWAYS_INLINE Vec<E, N> operator op(Scalar<E> s, const Vec<E, N>& a) {                 \
    Vec<E, N> r;                                                                 \
    for (int k = 0; k < PIECES; ++k) r.p[k] = s op a.p[k];                       \
    return r;                                                                    \
  }                                                                              \
  template <typename E, typename N, typename B>                                  \
  ALWAYS_INLINE Vec<E, N>& operator op##=(Vec<E, N>& a, const B& b) { return a = a op b; }
SCALESWEEP_BINARY(+)
SCALESWEEP_BINARY(-)
SCALESWEEP_BINARY(*)
SCALESWEEP_BINARY(/)
SCALESWEEP_BINARY(&)
SCALESWEEP_BINARY(|)
SCALESWEEP_BINARY(<<)
SCALESWEEP_BINARY(>>)
#undef SCALESWEEP_BINARY
template <typename E, typename N>
ALWAYS_INLINE Vec<E, N> operator-(const Vec<E, N>& a) {
  Vec<E, N> r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = -a.p[k];
  return r;
}

// Bit casts and value conversions, piece by piece (a whole-struct memcpy would go
// through the stack in halves and stall store forwarding).
template <typename To, typename E, typename N>
ALWAYS_INLINE To bitcast(const Vec<E, N>& a) {
  To r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = (std::remove_reference_t<decltype(r.p[0])>)a.p[k];
  return r;
}
ALWAYS_INLINE vf as_f(const vi& a) { return bitcast<vf>(a); }
ALWAYS_INLINE vi as_i(const vf& a) { return bitcast<vi>(a); }
ALWAYS_INLINE vf to_f(const vi& a) {
  vf r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = __builtin_convertvector(a.p[k], nf);
  return r;
}
ALWAYS_INLINE vi to_i(const vf& a) {  // truncation, as C's cast
  vi r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = __builtin_convertvector(a.p[k], ni);
  return r;
}

constexpr int BS = 16;        // NVFP4 block size = lanes per vector = blocks per tile
constexpr int MAX_CODE = 126; // largest finite positive FP8 E4M3 code
constexpr float FP8_MAX = 448.0f;
constexpr float FP4_MAX = 6.0f;
static_assert(PIECES * NL == BS);
// sweep.py constants (see its module docstring); the launcher checks they match.
constexpr float MARGIN = 0x1p-8f;         // LOWER_BOUND_MARGIN
constexpr float FLUSH_SCALED = 0x1p-12f;  // FLUSH_SCALED
constexpr float WEIGHT_FLUSH = 0x1p-40f;  // WEIGHT_FLUSH
constexpr int UPPER_OFFSET = 7;           // UPPER_OFFSET
constexpr int STAGE1_OFFSET = 3;          // MSE_STAGE1_OFFSET

ALWAYS_INLINE vf splat(float s) {
  vf r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = nf{} + s;
  return r;
}
ALWAYS_INLINE vi splati(int32_t s) {
  vi r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = ni{} + s;
  return r;
}

// Lane masks (-1 true, 0 false), as vector comparisons give them.
#define SCALESWEEP_CMP(name, op)                                                   \
  template <typename E, typename N>                                                \
  ALWAYS_INLINE vi name(const Vec<E, N>& a, const Vec<E, N>& b) {                         \
    vi r;                                                                          \
    for (int k = 0; k < PIECES; ++k) r.p[k] = (ni)(a.p[k] op b.p[k]);             \
    return r;                                                                      \
  }                                                                                \
  template <typename E, typename N>                                                \
  ALWAYS_INLINE vi name(const Vec<E, N>& a, Scalar<E> s) {                                \
    vi r;                                                                          \
    for (int k = 0; k < PIECES; ++k) r.p[k] = (ni)(a.p[k] op s);                  \
    return r;                                                                      \
  }
SCALESWEEP_CMP(lt, <)
SCALESWEEP_CMP(le, <=)
SCALESWEEP_CMP(gt, >)
SCALESWEEP_CMP(ge, >=)
SCALESWEEP_CMP(eq, ==)
#undef SCALESWEEP_CMP
// m ? a : b per lane (m a lane mask).
template <typename E, typename N>
ALWAYS_INLINE Vec<E, N> sel(const vi& m, const Vec<E, N>& a, const Vec<E, N>& b) {
  Vec<E, N> r;
  for (int k = 0; k < PIECES; ++k) r.p[k] = m.p[k] ? a.p[k] : b.p[k];
  return r;
}
// a < b ? a : b and a > b ? a : b, which is what x86's min/max instructions compute.
#if defined(__AVX512F__)
ALWAYS_INLINE vf vmin(vf a, vf b) { return vf{{(nf)_mm512_min_ps((__m512)a.p[0], (__m512)b.p[0])}}; }
ALWAYS_INLINE vf vmax(vf a, vf b) { return vf{{(nf)_mm512_max_ps((__m512)a.p[0], (__m512)b.p[0])}}; }
#else
ALWAYS_INLINE vf vmin(vf a, vf b) { return sel(lt(a, b), a, b); }
ALWAYS_INLINE vf vmax(vf a, vf b) { return sel(gt(a, b), a, b); }
#endif
ALWAYS_INLINE vi vmini(vi a, vi b) { return sel(lt(a, b), a, b); }
ALWAYS_INLINE vi vmaxi(vi a, vi b) { return sel(gt(a, b), a, b); }
ALWAYS_INLINE vf vabs(vf a) { return as_f(as_i(a) & 0x7FFFFFFF); }
ALWAYS_INLINE int32_t hmax(vi a) {
  int32_t m = a[0];
  for (int j = 1; j < BS; ++j) m = a[j] > m ? a[j] : m;
  return m;
}

// The largest of the 16 lanes (piecewise, then by halving shuffles within a piece).
template <int D, size_t... L>
constexpr ni xor_mask(std::index_sequence<L...>) {
  return ni{int(L ^ D)...};
}
template <int D>
ALWAYS_INLINE nf hmax_step(nf m) {
  if constexpr (D >= 1) {
    constexpr ni mask = xor_mask<D>(std::make_index_sequence<NL>{});
    const nf s = __builtin_shuffle(m, mask);
    return hmax_step<D / 2>(m > s ? m : s);
  } else {
    return m;
  }
}
ALWAYS_INLINE float hmax_f(const vf& a) {
  nf m = a.p[0];
  for (int k = 1; k < PIECES; ++k) m = m > a.p[k] ? m : a.p[k];
  return hmax_step<NL / 2>(m)[0];
}

ALWAYS_INLINE vf vsqrt(vf a) {
#if defined(__AVX512F__)
  return vf{{(nf)_mm512_sqrt_ps((__m512)a.p[0])}};
#else
  vf r;
  for (int k = 0; k < PIECES; ++k)  // GCC emits the native sqrtps for this loop
    for (int j = 0; j < NL; ++j) r.p[k][j] = std::sqrt(a.p[k][j]);
  return r;
#endif
}

ALWAYS_INLINE int32_t bits_of(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }
ALWAYS_INLINE float float_of(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }

// nvfp4.round_e2m1_magnitude for r >= 0 (rne(r / step) * step, saturated at 6).
// (r + M) - M rounds r to a multiple of the fp32 spacing at M, ties to even. With
// M = 2^22 * max(2^floor(log2 r), 1), that spacing is 0.5 below 2, 1 in [2, 4) and
// 2 in [4, 8): the E2M1 step there, so this is exactly rne(r / step) * step. Above
// 8 the spacing grows, the result stays >= 8 and saturates to 6, as in the
// reference. M comes from r's exponent bits: max(bits & exponent, bits(1.0)) +
// 22 in the exponent field.
ALWAYS_INLINE vf round_e2m1_mag(vf r) {
  vf m = as_f(vmaxi(as_i(r) & 0x7F800000, splati(0x3F800000)) + (22 << 23));
  return vmin((r + m) - m, splat(FP4_MAX));
}

// FP8 E4M3 code -> fp32 value: 1..7 are k * 2^-9, 8e + j is 2^(e-7) (1 + j/8).
ALWAYS_INLINE float fp8_value(int32_t c) {
  return c < 8 ? float(c) * 0x1p-9f : float_of((((c >> 3) + 120) << 23) | ((c & 7) << 20));
}
ALWAYS_INLINE vf fp8_value_v(vi c) {
  vf sub = to_f(c) * 0x1p-9f;
  vi nb = (((c >> 3) + 120) << 23) | ((c & 7) << 20);
  return sel(lt(c, 8), sub, as_f(nb));
}

// nvfp4._fp8_floor_code on 16 lanes, for finite t >= 0: floor code, sign of
// (t - midpoint to the next code), whether t is the code's value.
ALWAYS_INLINE vi fp8_floor_v(vf t, vi& rest_sign, vi& exact) {
  vi b = as_i(t);
  vi ncode = (((b >> 23) - 120) << 3) + ((b & 0x7FFFFF) >> 20);
  vi rest = b & 0xFFFFF;
  vi nsign = sel(gt(rest, 0x80000), splati(1), sel(lt(rest, 0x80000), splati(-1), splati(0)));
  vf ts = t * 512.0f;                        // subnormal range: ts < 8
  vf rn = (ts + 0x1p23f) - 0x1p23f;          // rne(ts)
  vf fl = sel(gt(rn, ts), rn - 1.0f, rn);    // floor(ts)
  vf fr = ts - fl;
  vi ssign = sel(gt(fr, 0.5f), splati(1), sel(lt(fr, 0.5f), splati(-1), splati(0)));
  vi normal = ge(t, 0x1p-6f);
  rest_sign = sel(normal, nsign, ssign);
  exact = sel(normal, eq(rest, 0), eq(fr, 0.0f));
  return sel(normal, ncode, to_i(fl));
}
ALWAYS_INLINE vf clamp448(vf t) { return vmin(vmax(t, splat(0.0f)), splat(FP8_MAX)); }
ALWAYS_INLINE vi fp8_rne_code_v(vf t) {
  vi rs, ex;
  vi code = fp8_floor_v(clamp448(t), rs, ex);
  vi up = gt(rs, 0) | (eq(rs, 0) & eq(code & 1, 1));
  code = code - up;  // up is -1 where true
  return vmaxi(vmini(code, splati(MAX_CODE)), splati(0));
}
ALWAYS_INLINE vi fp8_ceil_code_v(vf t) {
  vi rs, ex;
  vi code = fp8_floor_v(clamp448(t), rs, ex);
  code = code - eq(ex, 0);  // + 1 where not exact
  return vmaxi(vmini(code, splati(MAX_CODE)), splati(1));
}

// sweep._absmax_codes_blocks: max(fp8_rne(min((amax / divisor) * G, 448)), 1).
ALWAYS_INLINE vi absmax_code_v(vf amax, vf g, float divisor = FP4_MAX) {
  vf t = vmin((amax / divisor) * g, splat(FP8_MAX));
  return vmaxi(fp8_rne_code_v(t), splati(1));
}

// sweep._tree_sum16 per lane: adjacent pairs, then pairs of those (the reference's
// fixed order; no reassociation without fast-math).
ALWAYS_INLINE vf tree16(const vf* e) {
  vf s0 = e[0] + e[1], s1 = e[2] + e[3], s2 = e[4] + e[5], s3 = e[6] + e[7];
  vf s4 = e[8] + e[9], s5 = e[10] + e[11], s6 = e[12] + e[13], s7 = e[14] + e[15];
  vf t0 = s0 + s1, t1 = s2 + s3, t2 = s4 + s5, t3 = s6 + s7;
  return (t0 + t1) + (t2 + t3);
}

// sweep.candidate_errors for one code per lane (lane = block): S * v^2, with S
// the fixed pairwise tree sum of the 16 terms (d * d) * w.
template <bool W>
ALWAYS_INLINE vf cand_err(const vf* A, const vf* Wt, vf g, vi code) {
  vf v = fp8_value_v(code);
  vf inv = g / v;
  vf e[BS];
  for (int i = 0; i < BS; ++i) {
    vf r = A[i] * inv;
    vf d = r - round_e2m1_mag(r);
    e[i] = d * d;
    if (W) e[i] = e[i] * Wt[i];
  }
  return tree16(e) * (v * v);
}

// sweep._clip_lo per lane: smallest code that can beat (or tie) error e_ref.
template <bool W>
ALWAYS_INLINE vi clip_lo_v(const vf* A, const vf* Wt, vf g, vf e_ref) {
  e_ref = e_ref * (1.0f + MARGIN);
  vf clip;
  if (!W) {
    vf ym = A[0] * g;
    for (int i = 1; i < BS; ++i) ym = vmax(ym, A[i] * g);
    clip = ym - vsqrt(e_ref);
  } else {
    clip = splat(-std::numeric_limits<float>::infinity());
    for (int i = 0; i < BS; ++i) {
      vf c = A[i] * g - vsqrt(e_ref / Wt[i]);
      clip = vmax(clip, sel(gt(Wt[i], 0.0f), c, splat(-std::numeric_limits<float>::infinity())));
    }
  }
  vf t = (clip / FP4_MAX) * (1.0f - MARGIN);
  return sel(gt(t, 0.0f), fp8_ceil_code_v(vmax(t, splat(0.0f))), splati(1));
}

// The 16 x 16 transpose (M[i][l] -> M[l][i]) by four butterfly stages: at distance
// d, rows i and i + d swap their off-diagonal d x d blocks: lane l of row i (l & d)
// takes lane l - d of row i + d, which takes lane l + d of row i. A distance of a
// whole piece or more moves pieces; a smaller one is a native shuffle in each piece.
template <int D, size_t... L>
constexpr ni shuffle_mask(std::index_sequence<L...>, bool upper) {
  return ni{(upper ? ((L & D) ? NL + int(L) : int(L) + D) : ((L & D) ? NL + int(L) - D : int(L)))...};
}
template <int D>
ALWAYS_INLINE void transpose_stage(vf* M) {
  for (int i = 0; i < BS; ++i) {
    if (i & D) continue;
    if constexpr (D >= NL) {
      constexpr int PD = D / NL;  // the distance in pieces
      for (int k = 0; k < PIECES; ++k) {
        if (!(k & PD)) continue;
        const nf a = M[i].p[k];
        M[i].p[k] = M[i + D].p[k - PD];
        M[i + D].p[k - PD] = a;
      }
    } else {
      constexpr ni lo = shuffle_mask<D>(std::make_index_sequence<NL>{}, false);
      constexpr ni hi = shuffle_mask<D>(std::make_index_sequence<NL>{}, true);
      for (int k = 0; k < PIECES; ++k) {
        const nf a = M[i].p[k], b = M[i + D].p[k];
        M[i].p[k] = __builtin_shuffle(a, b, lo);
        M[i + D].p[k] = __builtin_shuffle(a, b, hi);
      }
    }
  }
}
ALWAYS_INLINE void transpose16(vf* M) {
  transpose_stage<8>(M);
  transpose_stage<4>(M);
  transpose_stage<2>(M);
  transpose_stage<1>(M);
}

// sweep._normalize_weights, per lane (block) of transposed weights Wt[element].
ALWAYS_INLINE void normalize_weights_v(vf* Wt) {
  vf wmax = Wt[0];
  for (int i = 1; i < BS; ++i) wmax = vmax(wmax, Wt[i]);
  vf pre = sel(lt(wmax, 0x1p-64f), splat(0x1p64f), sel(ge(wmax, 0x1p64f), splat(0x1p-64f), splat(1.0f)));
  vf m1 = wmax * pre;
  vi e = ((as_i(m1) >> 23) & 0xFF) - 127;
  vf inv = as_f((127 - e) << 23);
  for (int i = 0; i < BS; ++i) {
    vf wn = (Wt[i] * pre) * inv;
    Wt[i] = sel(lt(wn, WEIGHT_FLUSH), splat(0.0f), wn);
  }
}

struct Args {
  int64_t nblocks, blocks_per_row, K, period;
  float g;
  int method;  // 0 absmax, 1 mse, 2 wmse, 3 four-over-six (MSE, evaluation baseline)
  bool fake;
  const float* w;  // [period, K] or null
};

// sweep._objective's magnitudes of one tile, one block per lane: A[element] = the
// 16 blocks' |x| (Xa in the natural layout, transposed), flushed where |x| * G is
// below FLUSH_SCALED. Returns each block's largest flushed magnitude.
ALWAYS_INLINE vf objective_lanes(const vf* Xa, vf g, vf* A) {
  for (int j = 0; j < BS; ++j) A[j] = Xa[j];
  transpose16(A);
  for (int i = 0; i < BS; ++i) A[i] = sel(lt(A[i] * g, FLUSH_SCALED), splat(0.0f), A[i]);
  vf am = A[0];
  for (int i = 1; i < BS; ++i) am = vmax(am, A[i]);
  return am;
}

// Sweep over codes [lo, hi] per lane; returns the smallest code of least error
// (best/best_err updated only where strictly better, so earlier codes win ties).
template <bool W>
ALWAYS_INLINE int32_t sweep_range(const vf* A, const vf* Wt, vf g, vi lo, vi hi, vi& best, vf& best_err) {
  const int32_t span = hmax(hi - lo) + 1;
  for (int32_t k = 0; k < span; ++k) {
    vi code = lo + k;
    vi valid = le(code, hi);
    code = sel(valid, code, lo);
    vf err = cand_err<W>(A, Wt, g, code);
    vi better = valid & lt(err, best_err);
    best_err = sel(better, err, best_err);
    best = sel(better, code, best);
  }
  return span;
}

// ScaleSweep codes of one tile. Xa: |x| of the 16 blocks, natural layout
// ([block] = 16 elements); padding blocks are 0.
template <bool W>
OUTLINE vi sweep_tile(const vf* Xa, const vf* Wn, const Args& p, int64_t& trips) {
  vf A[BS], Wt[BS];
  const vf g = splat(p.g);
  const vf am = objective_lanes(Xa, g, A);
  if (W) {
    for (int j = 0; j < BS; ++j) Wt[j] = Wn[j];
    transpose16(Wt);
    normalize_weights_v(Wt);
  }
  // sweep._stage1_blocks: c0, the upper bound, the first window
  const vi c0 = absmax_code_v(am, g);
  vi hi = sel(ge(c0, 8), vmini(c0 + UPPER_OFFSET, splati(MAX_CODE)), splati(15));
  const vf t_hi = ((am * g) / 3.5f) * (1.0f + MARGIN);
  const vi hd = vmaxi(fp8_ceil_code_v(t_hi) - 1, splati(15));
  hi = sel(le(t_hi, FP8_MAX), vmini(hi, hd), hi);
  hi = sel(eq(am, 0.0f), splati(1), hi);  // every error is 0: the smallest code, 1, wins
  // Stage 1 from c0 - 3 (the reference starts at max(min(clip(E(c0)), c0), c0 - 3),
  // a subset: evaluating E(c0) and its bound costs about what the extra codes do).
  const vi lo1 = vmaxi(c0 - STAGE1_OFFSET, splati(1));
  vi best = lo1;
  vf err = splat(std::numeric_limits<float>::infinity());
  trips += sweep_range<W>(A, Wt, g, lo1, hi, best, err);
  // Stage 2 below the first window, down to the proven clipping bound against the
  // best error so far (empty on almost every block). Its codes are smaller: they
  // win ties. For MSE this is sweep._sweep_blocks; for WMSE the reference sweeps
  // [min(clip(E(c0)), c0), hi] in one stage, and codes below clip(E(best)) >=
  // clip(E(c0)) are strictly worse than best, so both return the same code.
  const vi lo2 = vmini(clip_lo_v<W>(A, Wt, g, err), lo1);
  if (hmax(lo1 - lo2) > 0) {
    vi best2 = lo2;
    vf err2 = splat(std::numeric_limits<float>::infinity());
    trips += sweep_range<W>(A, Wt, g, lo2, lo1 - 1, best2, err2);
    const vi take = lt(lo2, lo1) & le(err2, err);
    best = sel(take, best2, best);
  }
  return best;
}

// sweep.four_over_six_scales without weights (the evaluation's peer baseline): per
// block the codes of amax/6 and amax/4 on the sweep's flushed magnitudes, and of
// the two the larger only where its error is strictly smaller (ties: the smaller).
OUTLINE vi four_over_six_tile(const vf* Xa, float gs) {
  vf A[BS];
  const vf g = splat(gs);
  const vf am = objective_lanes(Xa, g, A);
  const vi c6 = absmax_code_v(am, g, FP4_MAX), c4 = absmax_code_v(am, g, 4.0f);
  const vf e6 = cand_err<false>(A, nullptr, g, c6), e4 = cand_err<false>(A, nullptr, g, c4);
  const vi six_lo = le(c6, c4);
  const vi lo = vmini(c6, c4), hi = vmaxi(c6, c4);
  const vf e_lo = sel(six_lo, e6, e4), e_hi = sel(six_lo, e4, e6);
  return sel(lt(e_hi, e_lo), hi, lo);
}

// Row of 16 values of x (natural layout) as fp32.
ALWAYS_INLINE vf load16(const float* p) {
  vf v;
  for (int k = 0; k < PIECES; ++k) std::memcpy(&v.p[k], p + k * NL, NB);
  return v;
}
ALWAYS_INLINE vf load16(const c10::BFloat16* p) {
  vf v;
  for (int k = 0; k < PIECES; ++k) {
    nh h;
    std::memcpy(&h, p + k * NL, sizeof h);
    v.p[k] = (nf)(__builtin_convertvector(h, nu) << 16);
  }
  return v;
}
ALWAYS_INLINE vf load16(const c10::Half* p) {
  float f[BS];
  for (int i = 0; i < BS; ++i) f[i] = static_cast<float>(p[i]);
  return load16(f);
}
// fp32 -> dtype, rounding to nearest even as torch's .to(dtype) (finite values).
ALWAYS_INLINE void store16(float* p, vf v) {
  for (int k = 0; k < PIECES; ++k) std::memcpy(p + k * NL, &v.p[k], NB);
}
ALWAYS_INLINE void store16(c10::BFloat16* p, vf v) {
  for (int k = 0; k < PIECES; ++k) {
    const nu u = (nu)v.p[k];
    const nu r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16;
    const nh h = __builtin_convertvector(r, nh);
    std::memcpy(p + k * NL, &h, sizeof h);
  }
}
ALWAYS_INLINE void store16(c10::Half* p, vf v) {
  float f[BS];
  store16(f, v);
  for (int i = 0; i < BS; ++i) p[i] = static_cast<c10::Half>(f[i]);
}

// Encode (and decode) one block with code c: q = round_e2m1(x * (G / v)); the
// fake-quantized value is (v / G) * q with x's sign (sweep.quantize_dequantize).
// inv = G / max(v, 2^-9) and s = v / G of the block's scale v (computed for a
// whole tile at once: one vector division each instead of two scalar ones per block).
template <typename T>
OUTLINE void emit_block(vf xv, float inv, float s, uint8_t* packed, T* out) {
  const vf r = xv * inv;
  const vi sign = as_i(r) & int32_t(0x80000000);
  const vf q = round_e2m1_mag(vabs(r));
  if (out) {
    store16(out, as_f(as_i(q * s) | sign));
    return;
  }
  vi idx = -(ge(q, 0.5f) + ge(q, 1.0f) + ge(q, 1.5f) + ge(q, 2.0f) + ge(q, 3.0f) +
             ge(q, 4.0f) + ge(q, 6.0f));
  idx = idx | bitcast<vi>(bitcast<vu>(sign) >> 28);
  for (int i = 0; i < BS / 2; ++i) packed[i] = uint8_t(idx[2 * i] | (idx[2 * i + 1] << 4));
}

template <typename T>
void run(const T* x, const Args& p, uint8_t* packed, uint8_t* scales, T* out, float* amax_out,
         int64_t* bad_out, int64_t* trips_out) {
  const int64_t tiles = (p.nblocks + BS - 1) / BS;
  const int slots = at::get_num_threads() > 0 ? at::get_num_threads() : 1;
  std::vector<float> amax(slots, 0.0f);
  std::vector<int64_t> bad(slots, 0), trips(slots, 0);
  // Grain: a thread's share must outweigh waking it (tens of microseconds): 64 tiles
  // (16k elements) of a sweep, 256 of AbsMax; smaller inputs run on the calling thread.
  const int64_t grain = (p.method == 0 || p.method == 3) ? 256 : 64;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    vf am = splat(0.0f);
    vi nb = splati(0);
    int64_t ntrips = 0;
    vf Xa[BS], Wn[BS];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * BS;
      const int n = int(p.nblocks - b0 < BS ? p.nblocks - b0 : BS);
      vi code;
      if (p.method == 0) {
        // AbsMax needs only each block's max: reduced across the block's lanes here,
        // instead of keeping the tile and transposing it (memory traffic, not math,
        // bounded this path). max is exact, so the order does not matter.
        float bm[BS];
        for (int j = 0; j < BS; ++j) {
          if (j < n) {
            const vf xa = vabs(load16(x + (b0 + j) * BS));
            nb += le(xa, std::numeric_limits<float>::max()) + 1;  // -1 + 1 where finite
            am = vmax(am, xa);
            bm[j] = hmax_f(xa);
          } else {
            bm[j] = 0.0f;
          }
        }
        code = absmax_code_v(load16(bm), splat(p.g));
      } else {
        for (int j = 0; j < BS; ++j) {
          if (j < n) {
            Xa[j] = vabs(load16(x + (b0 + j) * BS));
            nb += le(Xa[j], std::numeric_limits<float>::max()) + 1;
            am = vmax(am, Xa[j]);
          } else {
            Xa[j] = splat(0.0f);
          }
        }
      }
      if (p.method == 1) {
        code = sweep_tile<false>(Xa, Wn, p, ntrips);
      } else if (p.method == 3) {
        code = four_over_six_tile(Xa, p.g);
        ntrips += 2;
      } else if (p.method == 2) {
        for (int j = 0; j < BS; ++j) {
          if (j < n) {
            const int64_t b = b0 + j;
            const int64_t row = b / p.blocks_per_row, col = (b % p.blocks_per_row) * BS;
            Wn[j] = load16(p.w + (row % p.period) * p.K + col);
          } else {
            Wn[j] = splat(0.0f);
          }
        }
        code = sweep_tile<true>(Xa, Wn, p, ntrips);
      }
      const vf vals = fp8_value_v(code);
      const vf inv = splat(p.g) / vmax(vals, splat(0x1p-9f));
      const vf sc = vals / p.g;
      for (int j = 0; j < n; ++j) {
        const int64_t b = b0 + j;
        const vf xv = load16(x + b * BS);  // again: in L1, cheaper than keeping the tile
        if (p.fake) {
          emit_block<T>(xv, inv[j], sc[j], nullptr, out + b * BS);
        } else {
          emit_block<T>(xv, inv[j], sc[j], packed + b * (BS / 2), static_cast<T*>(nullptr));
          scales[b] = uint8_t(code[j]);
        }
      }
    }
    const int tid = at::get_thread_num();
    const int slot = tid >= 0 && tid < slots ? tid : 0;
    float m = 0.0f;
    int64_t c = 0;
    for (int i = 0; i < BS; ++i) {
      m = am[i] > m ? am[i] : m;
      c += nb[i];
    }
    amax[slot] = m > amax[slot] ? m : amax[slot];
    bad[slot] += c;
    trips[slot] += ntrips;
  });
  float am = 0.0f;
  int64_t nb = 0, nt = 0;
  for (int i = 0; i < slots; ++i) {
    am = amax[i] > am ? amax[i] : am;
    nb += bad[i];
    nt += trips[i];
  }
  *amax_out = am;
  *bad_out = nb;
  *trips_out = nt;
}


// ---------------------------------------------------------------------------
// The block-Hessian sweep (hessian_sweep.py), one tile = 16 rows of one column
// block: lane r is row r's block, and all lanes share that block's factor L (a
// scalar per entry). Same operations as the reference: d = sign * (y - v q),
// z_k = tree_j(L[j][k] * d_j), E = tree_k(z_k * z_k), the window [min(clip(E(c0)),
// c0), max(first zero code, c0)], candidates ascending with pruning by the lower
// bound, ties to the smaller code. The pruning test's sum of d^2 is the fixed tree
// here and torch's order there: both are within the bound's margin, and pruning
// never drops a code that wins or ties (the reference's proof), so both return the
// exhaustive sweep's code.
// ---------------------------------------------------------------------------
constexpr float PRUNE_SLACK = 0x1p-100f;  // hessian_sweep.PRUNE_SLACK


// hessian_sweep._errors' d for one code per lane.
ALWAYS_INLINE void hess_d(const vf* A, const vf* Sg, const vf* Y, vf g, vi code, vf* D) {
  const vf v = fp8_value_v(code);
  const vf inv = g / v;
  for (int i = 0; i < BS; ++i) D[i] = Sg[i] * (Y[i] - v * round_e2m1_mag(A[i] * inv));
}

// E = |L^T d|^2 with L row-major [j][k] (lower-triangular; its zeros are multiplied
// like the reference's, so every partial sum is the reference's).
ALWAYS_INLINE vf hess_form(const float* L, const vf* D) {
  vf zz[BS], p[BS];
  for (int k = 0; k < BS; ++k) {
    for (int j = 0; j < BS; ++j) p[j] = D[j] * L[j * BS + k];
    const vf z = tree16(p);
    zz[k] = z * z;
  }
  return tree16(zz);
}

// hessian_sweep._lower_bound: max(max_i w_i d_i^2, lam |d|^2) (1 - margin) - slack.
ALWAYS_INLINE vf hess_lb(const vf* D, const float* w, float lam) {
  vf e[BS];
  vf m = splat(0.0f);
  for (int i = 0; i < BS; ++i) {
    e[i] = D[i] * D[i];
    m = vmax(m, e[i] * w[i]);
  }
  return vmax(m, tree16(e) * lam) * (1.0f - MARGIN) - PRUNE_SLACK;
}

ALWAYS_INLINE int lanes_set(const vi& m) {
  int n = 0;
  for (int j = 0; j < BS; ++j) n += m[j] != 0;
  return n;
}

// Codes of one tile; Xs: the rows' signed blocks in the natural layout (padding 0).
OUTLINE vi hessian_tile(const vf* Xs, float gs, const float* L, const float* w, float lam,
                        int64_t& cands, int64_t& forms) {
  vf A[BS], Sg[BS], Y[BS], D[BS];
  const vf g = splat(gs);
  for (int j = 0; j < BS; ++j) A[j] = Xs[j];
  transpose16(A);
  vf am = splat(0.0f);
  for (int i = 0; i < BS; ++i) {
    Sg[i] = sel(lt(A[i], 0.0f), splat(-1.0f), splat(1.0f));
    vf a = vabs(A[i]);
    a = sel(lt(a * g, FLUSH_SCALED), splat(0.0f), a);
    A[i] = a;
    Y[i] = a * g;
    am = vmax(am, a);
  }
  const vi c0 = absmax_code_v(am, g);
  hess_d(A, Sg, Y, g, c0, D);
  vf best_e = hess_form(L, D);
  vi best = c0;
  vf Wt[BS];
  for (int i = 0; i < BS; ++i) Wt[i] = splat(w[i]);
  const vi lo = vmini(clip_lo_v<true>(A, Wt, g, best_e), c0);
  // hi = max(first_zero_code(am), c0): the first code >= c0 at which am rounds to 0
  // (rounding falls as the code grows), 126 if none
  vi found = eq(round_e2m1_mag(am * (g / fp8_value_v(c0))), 0.0f);
  vi hi = c0;
  for (int32_t c = -hmax(0 - c0) + 1; c <= MAX_CODE && lanes_set(found) < BS; ++c) {
    const vi cv = splati(c);
    const vi hit = eq(found, 0) & gt(cv, c0) &
                   eq(round_e2m1_mag(am * (g / fp8_value(c))), 0.0f);
    hi = sel(hit, cv, hi);
    found = found | hit;
  }
  hi = sel(found, hi, splati(MAX_CODE));
  cands += BS;
  forms += BS;
  const int32_t cmax = hmax(hi);
  for (int32_t c = -hmax(0 - lo); c <= cmax; ++c) {
    const vi cv = splati(c);
    const vi inside = le(lo, cv) & le(cv, hi) & eq(eq(c0, cv), 0);
    const int n_in = lanes_set(inside);
    if (n_in == 0) continue;
    cands += n_in;
    hess_d(A, Sg, Y, g, cv, D);
    const vi live = inside & le(hess_lb(D, w, lam), best_e);
    const int n_live = lanes_set(live);
    if (n_live == 0) continue;
    forms += n_live;
    const vf e = hess_form(L, D);
    const vi better = live & (lt(e, best_e) | (eq(e, best_e) & lt(cv, best)));
    best_e = sel(better, e, best_e);
    best = sel(better, cv, best);
  }
  return best;
}

}  // namespace

// x: contiguous [R, K] float32/float16/bfloat16; w: contiguous fp32 [period, K]
// (row r of x uses row r % period) or an empty tensor. Returns (packed uint8
// [R, K/2] or the fake-quantized [R, K] in x's dtype, scale codes uint8 [R, K/16],
// max|x| * G in fp32 over the finite elements, the count of non-finite elements,
// candidate evaluations per 16-block tile summed over tiles: the benchmark's work).
std::tuple<torch::Tensor, torch::Tensor, double, int64_t, int64_t> nvfp4_cpu(
    torch::Tensor x, double g, int64_t method, torch::Tensor w, int64_t period, bool fake) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2, "x: contiguous 2-D CPU");
  TORCH_CHECK(x.size(1) % BS == 0, "K must be a multiple of 16");
  TORCH_CHECK(method >= 0 && method <= 3, "method");
  const int64_t R = x.size(0), K = x.size(1);
  Args p{R * (K / BS), K / BS, K, period < 1 ? 1 : period, float(g), int(method), fake, nullptr};
  if (method == 2) {
    TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.dim() == 2 &&
                    w.size(0) == p.period && w.size(1) == K,
                "w: contiguous fp32 [period, K]");
    p.w = w.data_ptr<float>();
  }
  torch::Tensor scales = torch::empty({R, K / BS}, x.options().dtype(torch::kUInt8));
  torch::Tensor main = fake ? torch::empty_like(x)
                            : torch::empty({R, K / 2}, x.options().dtype(torch::kUInt8));
  float amax = 0.0f;
  int64_t bad = 0, trips = 0;
  uint8_t* packed = fake ? nullptr : main.data_ptr<uint8_t>();
  uint8_t* sc = scales.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case torch::kFloat32:
      run<float>(x.data_ptr<float>(), p, packed, sc, fake ? main.data_ptr<float>() : nullptr,
                 &amax, &bad, &trips);
      break;
    case torch::kBFloat16:
      run<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), p, packed, sc,
                         fake ? main.data_ptr<c10::BFloat16>() : nullptr, &amax, &bad, &trips);
      break;
    case torch::kHalf:
      run<c10::Half>(x.data_ptr<c10::Half>(), p, packed, sc,
                     fake ? main.data_ptr<c10::Half>() : nullptr, &amax, &bad, &trips);
      break;
    default:
      TORCH_CHECK(false, "x must be float32, float16 or bfloat16");
  }
  const float scaled_max = amax * p.g;  // fp32, as sweep.validate computes max|x| * G
  return {main, scales, double(scaled_max), bad, trips};
}

// packed uint8 [R, K/2], scale bytes uint8 [R, K/16] -> (v / G) * q in dtype, with
// v = table[byte] (torch's float8_e4m3fn -> float32 of every byte, NaN included).
torch::Tensor nvfp4_dequant_cpu(torch::Tensor packed, torch::Tensor scales, double g,
                                torch::ScalarType dtype, torch::Tensor table) {
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.numel() == 256, "table: fp32 [256]");
  torch::Tensor tabc = table.contiguous();
  const float* tab = tabc.data_ptr<float>();
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && packed.dim() == 2, "layout");
  const int64_t R = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(scales.size(0) == R && scales.size(1) * BS == K, "scales do not match packed");
  torch::Tensor out = torch::empty({R, K}, packed.options().dtype(dtype));
  static const float E2M1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const uint8_t* sc = scales.data_ptr<uint8_t>();
  const float gf = float(g);
  const int64_t nblocks = R * (K / BS);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nvfp4_dequant_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1024, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float s = tab[sc[b]] / gf;
        for (int i = 0; i < BS; ++i) {
          uint8_t c = (pk[b * (BS / 2) + i / 2] >> ((i & 1) * 4)) & 0xF;
          float m = E2M1[c & 7];
          o[b * BS + i] = static_cast<scalar_t>(s * ((c & 8) ? -m : m));
        }
      }
    });
  });
  return out;
}


// x: contiguous fp32 [R, K]; L: fp32 [K/16, 16, 16] (lower factors), w: fp32 [K/16, 16]
// (1 / P_ii), lam: fp32 [K/16]. Returns (codes uint8 [R, K/16], candidates, forms).
// The caller checks x and G against the reference's domain first.
std::tuple<torch::Tensor, int64_t, int64_t> hessian_cpu(torch::Tensor x, double g, torch::Tensor L,
                                                       torch::Tensor w, torch::Tensor lam) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2 &&
                  x.scalar_type() == torch::kFloat32,
              "x: contiguous fp32 2-D CPU");
  TORCH_CHECK(x.size(1) % BS == 0, "K must be a multiple of 16");
  const int64_t R = x.size(0), K = x.size(1), nb = K / BS;
  TORCH_CHECK(L.scalar_type() == torch::kFloat32 && L.is_contiguous() && L.dim() == 3 &&
                  L.size(0) == nb && L.size(1) == BS && L.size(2) == BS,
              "L: contiguous fp32 [K/16, 16, 16]");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.dim() == 2 &&
                  w.size(0) == nb && w.size(1) == BS,
              "w: contiguous fp32 [K/16, 16]");
  TORCH_CHECK(lam.scalar_type() == torch::kFloat32 && lam.is_contiguous() && lam.numel() == nb,
              "lam: contiguous fp32 [K/16]");
  torch::Tensor codes = torch::empty({R, nb}, x.options().dtype(torch::kUInt8));
  const float* xp = x.data_ptr<float>();
  const float* Lp = L.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* lp = lam.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  const float gf = float(g);
  const int64_t rtiles = (R + BS - 1) / BS;
  const int slots = at::get_num_threads() > 0 ? at::get_num_threads() : 1;
  std::vector<int64_t> cands(slots, 0), forms(slots, 0);
  // column block major: consecutive tiles share L
  at::parallel_for(0, rtiles * nb, 16, [&](int64_t t0, int64_t t1) {
    int64_t nc = 0, nf = 0;
    vf Xs[BS];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / rtiles, r0 = (t % rtiles) * BS;
      const int n = int(R - r0 < BS ? R - r0 : BS);
      for (int j = 0; j < BS; ++j) Xs[j] = j < n ? load16(xp + (r0 + j) * K + b * BS) : splat(0.0f);
      const vi code = hessian_tile(Xs, gf, Lp + b * BS * BS, wp + b * BS, lp[b], nc, nf);
      for (int j = 0; j < n; ++j) cp[(r0 + j) * nb + b] = uint8_t(code[j]);
      nc -= BS - n;  // padding lanes: counted once as c0, never inside a window
      nf -= BS - n;
    }
    const int tid = at::get_thread_num();
    const int slot = tid >= 0 && tid < slots ? tid : 0;
    cands[slot] += nc;
    forms[slot] += nf;
  });
  int64_t nc = 0, nf = 0;
  for (int i = 0; i < slots; ++i) {
    nc += cands[i];
    nf += forms[i];
  }
  return {codes, nc, nf};
}

std::vector<double> constants() {
  return {MARGIN,           FLUSH_SCALED, WEIGHT_FLUSH, double(UPPER_OFFSET),
          double(STAGE1_OFFSET), double(MAX_CODE), PRUNE_SLACK};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nvfp4", &nvfp4_cpu, "NVFP4 quantize / fake-quantize (AbsMax, MSE, WMSE, four-over-six)");
  m.def("dequant", &nvfp4_dequant_cpu, "NVFP4 dequantize");
  m.def("hessian", &hessian_cpu, "block-Hessian ScaleSweep codes (hessian_sweep.py)");
  m.def("gemm_w4a16", &nvfp4_gemm_w4a16_cpu, "NVFP4 W4A16 GEMM, packed weights (nvfp4_gemm.cpp)");
  m.def("gemm_w4a4", &nvfp4_gemm_w4a4_cpu, "NVFP4 W4A4 GEMM, packed weights (nvfp4_gemm.cpp)");
  m.def("constants", &constants, "the reference constants compiled in");
}
