// Fused multi-tensor AdamHD step for CPU tensors (AdamW with a decoupled Huber decay).
//
// One call updates a whole list of tensors: the lists are laid end to end as one virtual element range, that range is
// split over torch's intra-op thread pool (at::parallel_for), and each thread walks the tensors its sub-range touches
// (rounded to whole kSumBlock blocks of each tensor, see below). Storage dtypes (fp32 / bf16) are template parameters,
// all math is fp32, stores round to nearest even (as torch's .to(torch.bfloat16)).
//
// Per element (tau = lr * weight_decay, bc2 = bc2_sqrt), every multiply-add a fused one (fma: one rounding):
//   g     = grad / grad_scale
//   m2    = fma(w, g - m, m)   with w = 1 - beta1 < 0.5, else fma(-(1 - w), g - m, g)    (torch.lerp's two forms)
//   v2    = fma(1 - beta2, g * g, beta2 * v)
//   x     = p
//   clip:   x = fma(-tau, clamp(x, -delta, delta), x)
//   x     = fma(-(step_size * bc2), m2 / (sqrt(v2) + eps * bc2), x)      (= x - step_size * m2 / (sqrt(v2)/bc2 + eps))
//   prox:   x = fma(-tau / (1 + tau), clamp(x, -(1 + tau) delta, (1 + tau) delta), x)
//                                                         (= x - tau * clamp(x / (1 + tau), -delta, delta))
//   if g is finite: store x, m2, v2; else leave p, m, v bit-for-bit unchanged and count the element.
// amsgrad (a max_exp_avg_sq tensor per tensor): vm2 = max(vm, v2) replaces v2 in the denominator and is stored with
// them (torch's AdamW: the running maximum of v, bias-corrected as v is); those calls take the portable code.
// The per-tensor constants (step_size * bc2, eps * bc2, (1 + tau) * delta, tau / (1 + tau)) are computed in double and
// rounded once to fp32. Written this way the step costs one division and one square root per element, as
// DeepSpeedCPUAdam's does; results differ from the formulas evaluated exactly only by fp32 roundings (a few ulps of
// the terms involved).
//
// Layer statistic Σ|x| (the AdamHD delta needs each layer's mean |θ|): `abs_sums` computes it for a list of tensors,
// and `adamhd_step` can emit it for the values it just stored (abs_sums_out), in the same pass. Both use ONE summation
// order, which depends only on the tensor's numel and values (never on its address, the thread count or split, or the
// ISA of the build); it is spelled out above BlockSum below. Work is split between threads at block boundaries (a
// block is always done whole by one thread), partials are stored per block and combined after the parallel region,
// so the result is bitwise reproducible; abs_sums_out == abs_sums(params) bit for bit.
//
// Every operation above is a single IEEE operation (fp32 add, multiply, divide, square root, fma; min / max with the
// operand order of std::min / std::max), written in the order shown. The build uses -ffp-contract=off (no FMA the
// source does not ask for) and no -ffast-math (infinities and NaNs follow IEEE rules), so an element's result does not
// depend on whether it is computed in a vector body, a scalar remainder or the x86 SIMD path below, i.e. on the thread
// split, the offset of a view, or the ISA the extension was built for.
//
// Code paths: portable C++ (vectorised by the compiler, #pragma omp simd) for every dtype combination; on x86 builds
// with AVX2 + FMA (or AVX-512), the all-fp32 update of whole 256-element ranges uses explicit intrinsics that fuse the
// finiteness check, the update and the statistic in one pass. A build with -DADAMHD_PORTABLE (ADAMHD_CPU_ISA=generic)
// uses the portable code only.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if !defined(ADAMHD_PORTABLE) && defined(__AVX512F__)
#define ADAMHD_SIMD 512
#include <immintrin.h>
#elif !defined(ADAMHD_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
#define ADAMHD_SIMD 256
#include <immintrin.h>
#else
#define ADAMHD_SIMD 0
#endif

#pragma STDC FP_CONTRACT OFF

namespace {

constexpr const char* kPathName = ADAMHD_SIMD == 512 ? "avx512" : ADAMHD_SIMD == 256 ? "avx2" : "portable";

enum DecayMode : int { kNone = 0, kProx = 1, kClip = 2 };

using bf16_raw = uint16_t;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Storage traits: load to fp32; store with round-to-nearest-even, or keep the old raw value bit-for-bit.
template <typename T>
struct Store;

template <>
struct Store<float> {
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
  // A bit select, not ?: (which GCC makes a conditional store, vectorised only with AVX-512's masked stores).
  static inline float select(bool keep_new, float x, float old) {
    const uint32_t keep = 0u - static_cast<uint32_t>(keep_new);
    return bits_to_float((float_to_bits(x) & keep) | (float_to_bits(old) & ~keep));
  }
};

template <>
struct Store<bf16_raw> {
  static inline float load(bf16_raw h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
  // Branch-free bit masks throughout, so loops mixing 16- and 32-bit element types still vectorise.
  static inline uint32_t round(float x) {
    // c10::BFloat16's round_to_nearest_even: NaN -> 0x7FC0, otherwise RNE on the upper 16 bits.
    const uint32_t u = float_to_bits(x);
    const uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = 0u - static_cast<uint32_t>(x != x);
    return (r & ~nan) | (UINT32_C(0x7FC0) & nan);
  }
  static inline bf16_raw store(float x) { return static_cast<bf16_raw>(round(x)); }
  static inline bf16_raw select(bool keep_new, float x, bf16_raw old) {
    const uint32_t keep = 0u - static_cast<uint32_t>(keep_new);
    return static_cast<bf16_raw>((round(x) & keep) | (static_cast<uint32_t>(old) & ~keep));
  }
};

struct Scalars {
  bool lerp_low;      // weight 1 - beta1 < 0.5: m + w*(g-m); else g - (g-m)*(1-w)
  float lerp_coef;    // w, or -(1 - w)
  float beta2;
  float one_minus_beta2;
  float neg_decay_c;  // clip: -tau; prox: -tau / (1 + tau)
  float grad_scale;
};

// Per tensor, rounded to fp32 from double products.
struct TensorScalars {
  float neg_step_bc;  // -step_size * bc2_sqrt
  float eps_bc;       // eps * bc2_sqrt
  float decay_hi;     // clip: delta; prox: (1 + tau) * delta
};

// ---------------------------------------------------------------------------------------------------------------
// The layer statistic Σ|x| of one block, in a fixed order. A block (kSumBlock elements, counted from the tensor's
// first element) is cut into sub-blocks of kSumSub; element i of a sub-block goes to lane l = i % kSumLanes, and
//   s[l] = fma(|x|, 2^-4, s[l])   in fp32 from s[l] = 0, over the sub-block's 8 elements of lane l, in element order;
//   L[l] = L[l] + 16 * s[l]       in double from L[l] = 0, once per sub-block, in sub-block order (16 * s is exact);
//   t[j] = (L[j] + L[8 + j]) + (L[16 + j] + L[24 + j])                                (j < 8)
//   sum  = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
// A short last sub-block is zero padded (+0 changes no sum). The tensor's sum = ((0 + block 0) + block 1) + ..., in
// double. The factor 2^-4 keeps every s[l] finite for finite input (8 values of at most FLT_MAX / 16).
// Error: the fma adds the exact |x| * 2^-4, so s[l] is a recursive fp32 sum of 8 non-negative terms, relative error at
// most 7u / (1 - 7u) = 4.172e-7 (u = 2^-24), while the partial sums stay normal (>= 2^-126; below that each addition
// errs by at most 2^-150, i.e. 2^-146 after the factor 16); the double additions add at most (8 + 5 + number of
// blocks) * 2^-53 relative, under 1e-9 below 2^34 elements. So |sum - Σ|x|| <= 4.2e-7 * Σ|x| + numel * 2^-146 there.
// (Exact double accumulation of every |x| costs two conversions and two double adds per 8 elements in the update loop;
// this costs one fma.)
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kSumBlock = 2048;  // elements per block (multiple of kSumSub)
constexpr int64_t kSumSub = 256;     // elements per sub-block; the update runs in ranges of this size
constexpr int kSumLanes = 32;
constexpr float kSumScale = 0.0625f;  // 2^-4
static_assert(kSumSub % kSumLanes == 0 && kSumBlock % kSumSub == 0, "sub-blocks hold whole lane groups");

template <typename T>
inline float abs_of(T x) {
  return bits_to_float(float_to_bits(Store<T>::load(x)) & 0x7FFFFFFFu);
}

// The double lanes of one block.
struct BlockSum {
  double L[kSumLanes] = {};
  // Adds one sub-block's fp32 lane sums s[0, kSumLanes).
  inline void add_lanes(const float* s) {
    for (int l = 0; l < kSumLanes; ++l) L[l] += 16.0 * static_cast<double>(s[l]);
  }
  // Adds one whole sub-block x[0, kSumSub) (portable code).
  template <typename T>
  inline void add_sub(const T* __restrict x) {
    alignas(64) float s[kSumLanes] = {};
    for (int64_t r = 0; r < kSumSub; r += kSumLanes) {
#pragma omp simd
      for (int l = 0; l < kSumLanes; ++l) s[l] = std::fma(abs_of(x[r + l]), kSumScale, s[l]);
    }
    add_lanes(s);
  }
  // Adds x[0, n), 0 < n <= kSumSub, zero padded to a whole sub-block.
  template <typename T>
  inline void add(const T* x, int64_t n);
  inline double finish() const {
    double t[8];
    for (int j = 0; j < 8; ++j) t[j] = (L[j] + L[8 + j]) + (L[16 + j] + L[24 + j]);
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
  }
};

// ---------------------------------------------------------------------------------------------------------------
// x86 SIMD: one vector type per build (8 or 16 fp32 lanes), the same operations as the portable code.
// ---------------------------------------------------------------------------------------------------------------
#if ADAMHD_SIMD == 512
struct Vec {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static inline F load(const float* x) { return _mm512_loadu_ps(x); }
  static inline I loadi(const float* x) { return _mm512_loadu_si512(x); }
  static inline void store(float* x, F a) { _mm512_storeu_ps(x, a); }
  static inline F set(float a) { return _mm512_set1_ps(a); }
  static inline I seti(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline I zeroi() { return _mm512_setzero_si512(); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F div(F a, F b) { return _mm512_div_ps(a, b); }
  static inline F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // std::max(x, lo) = x < lo ? lo : x  and  std::min(x, hi) = hi < x ? hi : x, NaN x kept: max_ps(a, b) is
  // a > b ? a : b and min_ps(a, b) is a < b ? a : b, both b when unordered.
  static inline F clamp(F x, F lo, F hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, x)); }
  static inline F abs(F a) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), seti(0x7FFFFFFFu))); }
  static inline I maxu(I a, I b) { return _mm512_max_epu32(a, b); }
  static inline I andi(I a, I b) { return _mm512_and_si512(a, b); }
  static inline uint32_t hmaxu(I a) { return _mm512_reduce_max_epu32(a); }
  static inline bool nan_any(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
};
#elif ADAMHD_SIMD == 256
struct Vec {
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static inline F load(const float* x) { return _mm256_loadu_ps(x); }
  static inline I loadi(const float* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  static inline void store(float* x, F a) { _mm256_storeu_ps(x, a); }
  static inline F set(float a) { return _mm256_set1_ps(a); }
  static inline I seti(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline I zeroi() { return _mm256_setzero_si256(); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F div(F a, F b) { return _mm256_div_ps(a, b); }
  static inline F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // (see the AVX-512 version)
  static inline F clamp(F x, F lo, F hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, x)); }
  static inline F abs(F a) { return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(a), seti(0x7FFFFFFFu))); }
  static inline I maxu(I a, I b) { return _mm256_max_epu32(a, b); }
  static inline I andi(I a, I b) { return _mm256_and_si256(a, b); }
  static inline uint32_t hmaxu(I a) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
  }
  static inline bool nan_any(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
};
#endif

#if ADAMHD_SIMD
constexpr int kVecs = kSumLanes / Vec::W;  // vectors per lane group: vector k holds lanes k*W .. k*W + W - 1

// BlockSum::add_sub for fp32, in vectors.
inline void simd_lane_sums(const float* __restrict x, float* __restrict out) {
  const Vec::F scale = Vec::set(kSumScale);
  Vec::F s[kVecs];
  for (auto& q : s) q = Vec::zero();
  for (int64_t r = 0; r < kSumSub; r += kSumLanes)
    for (int k = 0; k < kVecs; ++k) s[k] = Vec::fma(Vec::abs(Vec::load(x + r + k * Vec::W)), scale, s[k]);
  for (int k = 0; k < kVecs; ++k) Vec::store(out + k * Vec::W, s[k]);
}
#endif

template <typename T>
inline void BlockSum::add(const T* x, int64_t n) {
  if (n < kSumSub) {
    T pad[kSumSub];
    std::memset(pad, 0, sizeof(pad));  // raw zero is +0.0 in fp32 and bf16
    std::memcpy(pad, x, static_cast<size_t>(n) * sizeof(T));
    add(static_cast<const T*>(pad), kSumSub);
    return;
  }
#if ADAMHD_SIMD
  if constexpr (std::is_same_v<T, float>) {
    alignas(64) float s[kSumLanes];
    simd_lane_sums(x, s);
    add_lanes(s);
    return;
  }
#endif
  add_sub(x);
}

// Σ|x[0..n)| for one block, 0 < n <= kSumBlock, in the fixed order above.
template <typename T>
double block_abs_sum(const T* __restrict x, int64_t n) {
  BlockSum acc;
  for (int64_t i = 0; i < n; i += kSumSub) acc.add(x + i, std::min(kSumSub, n - i));
  return acc.finish();
}

inline int64_t num_blocks(int64_t n) { return (n + kSumBlock - 1) / kSumBlock; }

// Calls f(j, e0, n) for the block-aligned pieces of the jobs (j < njobs, job j = elements [starts[j], starts[j+1]) of
// a virtual concatenation, all jobs non-empty), spread over torch's thread pool: the virtual range is split into
// thread ranges, and a block belongs to the thread whose range holds the block's first element. e0 (a multiple of
// kSumBlock) and n are relative to job j; each block of each job is in exactly one piece.
template <typename F>
void parallel_block_pieces(const std::vector<int64_t>& starts, int64_t grain, const F& f) {
  const size_t njobs = starts.size() - 1;
  const int64_t total = starts[njobs];
  if (total == 0) return;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    size_t j = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
    for (; j < njobs && starts[j] < end; ++j) {
      const int64_t s = starts[j];
      const int64_t n = starts[j + 1] - s;
      const int64_t lo = std::max(begin, s) - s;
      const int64_t hi = std::min(end, s + n) - s;
      const int64_t k0 = num_blocks(lo);  // first block starting at or after lo
      const int64_t k1 = num_blocks(hi);  // first block starting at or after hi
      if (k0 >= k1) continue;
      const int64_t e0 = k0 * kSumBlock;
      f(j, e0, std::min(n, k1 * kSumBlock) - e0);
    }
  });
}

// Per-tensor sums from the block partials: 0.0 + p0 + p1 + ..., in block order.
inline double combine_partials(const double* partials, int64_t nblocks) {
  double s = 0.0;
  for (int64_t k = 0; k < nblocks; ++k) s += partials[k];
  return s;
}

// Loop constants of one tensor, as plain floats (passed by value: nothing the compiler must assume aliases p/g/m/v).
struct LoopConsts {
  uint32_t lerp_mask;    // all ones: m2 = m + w*(g - m);  zero: m2 = g - (1 - w)*(g - m)
  bool lerp_low;         // lerp_mask is all ones
  float lerp_coef;       // w, or -(1 - w)
  float beta2, omb2;
  float eps_bc;          // eps * bc2_sqrt
  float neg_step_bc;     // -step_size * bc2_sqrt
  float gs;              // grad_scale
  float neg_c;           // -(decay coefficient): clip: -tau;  prox: -tau / (1 + tau)
  float lo, hi;          // clamp bounds: clip: +-delta;  prox: +-(1 + tau) * delta
};

// The update of one element (see the top of this file).
template <int MODE, bool LERP_LOW>
inline __attribute__((always_inline)) float element(float gi, float mi, float vi, float pi, const LoopConsts& c,
                                                    float& m2, float& v2) {
  // base = lerp_low ? mi : gi, as a bit select (GCC will not vectorise a ?: on a loop-invariant bool in loops that mix
  // 16- and 32-bit element types); a compile-time choice where the caller knows it.
  const float base =
      LERP_LOW ? mi : bits_to_float((float_to_bits(mi) & c.lerp_mask) | (float_to_bits(gi) & ~c.lerp_mask));
  m2 = std::fma(c.lerp_coef, gi - mi, base);
  v2 = std::fma(c.omb2, gi * gi, c.beta2 * vi);
  const float denom = std::sqrt(v2) + c.eps_bc;
  float x = pi;
  if (MODE == kClip) x = std::fma(c.neg_c, std::min(std::max(x, c.lo), c.hi), x);
  x = std::fma(c.neg_step_bc, m2 / denom, x);
  if (MODE == kProx) x = std::fma(c.neg_c, std::min(std::max(x, c.lo), c.hi), x);
  return x;
}

// element() with amsgrad: the denominator from vm2 = max(vm, v2) (std::max: vm when v2 is not larger).
template <int MODE, bool LERP_LOW>
inline __attribute__((always_inline)) float element_ams(float gi, float mi, float vi, float vmi, float pi,
                                                        const LoopConsts& c, float& m2, float& v2, float& vm2) {
  const float base =
      LERP_LOW ? mi : bits_to_float((float_to_bits(mi) & c.lerp_mask) | (float_to_bits(gi) & ~c.lerp_mask));
  m2 = std::fma(c.lerp_coef, gi - mi, base);
  v2 = std::fma(c.omb2, gi * gi, c.beta2 * vi);
  vm2 = std::max(vmi, v2);
  const float denom = std::sqrt(vm2) + c.eps_bc;
  float x = pi;
  if (MODE == kClip) x = std::fma(c.neg_c, std::min(std::max(x, c.lo), c.hi), x);
  x = std::fma(c.neg_step_bc, m2 / denom, x);
  if (MODE == kProx) x = std::fma(c.neg_c, std::min(std::max(x, c.lo), c.hi), x);
  return x;
}

// Whether every gradient of a range, divided by grad_scale when SCALE, is finite, from the largest |g| as bits (`top`:
// the order of non-negative floats, with inf and NaN above every finite value): it and its quotient must be finite
// (rounding is monotonic, so no smaller |g| / |grad_scale| can overflow).
template <bool SCALE>
inline bool finite_top(uint32_t top, float gs) {
  return top < 0x7F800000u && (!SCALE || bits_to_float(top) / std::abs(gs) <= FLT_MAX);
}

template <typename G, bool SCALE>
inline bool all_finite(const G* __restrict g, int64_t b0, int64_t b1, float gs) {
  uint32_t top = 0;
  int64_t i = b0;
  if (b1 - b0 >= kSumLanes) {  // in lanes, several vectors wide: the scan is not one long dependency chain
    uint32_t lanes[kSumLanes] = {};
    for (; i + kSumLanes <= b1; i += kSumLanes) {
#pragma omp simd
      for (int l = 0; l < kSumLanes; ++l)
        lanes[l] = std::max(lanes[l], float_to_bits(Store<G>::load(g[i + l])) & 0x7FFFFFFFu);
    }
    for (int l = 0; l < kSumLanes; ++l) top = std::max(top, lanes[l]);
  }
  for (; i < b1; ++i) top = std::max(top, float_to_bits(Store<G>::load(g[i])) & 0x7FFFFFFFu);
  return finite_top<SCALE>(top, gs);
}

// The update of elements [b0, b1) of one tensor, in portable code. Returns the non-finite count (int32: keeps the simd
// reduction narrow). `finite`: the caller has checked that every gradient of the range is finite (all_finite), and
// lerp_low holds; the loop then has no masks. Otherwise every store selects between the new and the old value (the
// same arithmetic, so the same bits for the finite elements).
template <typename P, typename G, typename S, int MODE, bool SCALE>
inline __attribute__((always_inline)) int32_t update_range(P* __restrict p, const G* __restrict g, S* __restrict m,
                                                           S* __restrict v, int64_t b0, int64_t b1, const LoopConsts& c,
                                                           bool finite) {
  if (finite) {
#pragma omp simd
    for (int64_t i = b0; i < b1; ++i) {
      float gi = Store<G>::load(g[i]);
      if (SCALE) gi = gi / c.gs;
      float m2, v2;
      const float x = element<MODE, true>(gi, Store<S>::load(m[i]), Store<S>::load(v[i]), Store<P>::load(p[i]), c,
                                          m2, v2);
      p[i] = Store<P>::store(x);
      m[i] = Store<S>::store(m2);
      v[i] = Store<S>::store(v2);
    }
    return 0;
  }
  int32_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = b0; i < b1; ++i) {
    float gi = Store<G>::load(g[i]);
    if (SCALE) gi = gi / c.gs;
    float m2, v2;
    const float x = element<MODE, false>(gi, Store<S>::load(m[i]), Store<S>::load(v[i]), Store<P>::load(p[i]), c,
                                         m2, v2);
    const bool fin = std::abs(gi) <= FLT_MAX;  // false for +-inf and NaN
    bad += fin ? 0 : 1;
    p[i] = Store<P>::select(fin, x, p[i]);
    m[i] = Store<S>::select(fin, m2, m[i]);
    v[i] = Store<S>::select(fin, v2, v[i]);
  }
  return bad;
}

// update_range with amsgrad (vm: the running maximum of v, stored like v).
template <typename P, typename G, typename S, int MODE, bool SCALE>
inline __attribute__((always_inline)) int32_t update_range_ams(P* __restrict p, const G* __restrict g,
                                                               S* __restrict m, S* __restrict v, S* __restrict vm,
                                                               int64_t b0, int64_t b1, const LoopConsts& c,
                                                               bool finite) {
  if (finite) {
#pragma omp simd
    for (int64_t i = b0; i < b1; ++i) {
      float gi = Store<G>::load(g[i]);
      if (SCALE) gi = gi / c.gs;
      float m2, v2, vm2;
      const float x = element_ams<MODE, true>(gi, Store<S>::load(m[i]), Store<S>::load(v[i]), Store<S>::load(vm[i]),
                                              Store<P>::load(p[i]), c, m2, v2, vm2);
      p[i] = Store<P>::store(x);
      m[i] = Store<S>::store(m2);
      v[i] = Store<S>::store(v2);
      vm[i] = Store<S>::store(vm2);
    }
    return 0;
  }
  int32_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = b0; i < b1; ++i) {
    float gi = Store<G>::load(g[i]);
    if (SCALE) gi = gi / c.gs;
    float m2, v2, vm2;
    const float x = element_ams<MODE, false>(gi, Store<S>::load(m[i]), Store<S>::load(v[i]), Store<S>::load(vm[i]),
                                             Store<P>::load(p[i]), c, m2, v2, vm2);
    const bool fin = std::abs(gi) <= FLT_MAX;
    bad += fin ? 0 : 1;
    p[i] = Store<P>::select(fin, x, p[i]);
    m[i] = Store<S>::select(fin, m2, m[i]);
    v[i] = Store<S>::select(fin, v2, v[i]);
    vm[i] = Store<S>::select(fin, vm2, vm[i]);
  }
  return bad;
}

#if ADAMHD_SIMD
// The update of one whole range [i0, i0 + kSumSub) of fp32 tensors whose gradients are known finite, with lerp_low:
// element() in vectors. With SUMS, also the fp32 lane sums of the stored |p| (out_sums, as BlockSum::add_sub); with
// NEXT, also the finiteness scan of the following range's gradients (returned as `top`, see finite_top), all in one
// pass over the data.
template <int MODE, bool SCALE, bool SUMS, bool NEXT>
inline uint32_t simd_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                           int64_t i0, const LoopConsts& c, float* __restrict out_sums) {
  using V = Vec;
  const V::F coef = V::set(c.lerp_coef), beta2 = V::set(c.beta2), omb2 = V::set(c.omb2), eps = V::set(c.eps_bc),
             step = V::set(c.neg_step_bc), gs = V::set(c.gs), nc = V::set(c.neg_c), lo = V::set(c.lo),
             hi = V::set(c.hi), scale = V::set(kSumScale);
  const V::I abs_mask = V::seti(0x7FFFFFFFu);
  const V::F zero = V::zero();
  V::F s[kVecs], zsum[kVecs];
  V::I top[kVecs];
  for (int k = 0; k < kVecs; ++k) {
    s[k] = zsum[k] = zero;
    top[k] = V::zeroi();
  }
  for (int64_t r = i0; r < i0 + kSumSub; r += kSumLanes) {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i = r + k * V::W;
      if (NEXT) {
        if (SCALE) top[k] = V::maxu(top[k], V::andi(V::loadi(g + i + kSumSub), abs_mask));
        else zsum[k] = V::fma(V::load(g + i + kSumSub), zero, zsum[k]);  // g * 0 is NaN for inf and NaN, else +-0
      }
      V::F gi = V::load(g + i);
      if (SCALE) gi = V::div(gi, gs);
      const V::F mi = V::load(m + i);
      const V::F m2 = V::fma(coef, V::sub(gi, mi), mi);
      const V::F v2 = V::fma(omb2, V::mul(gi, gi), V::mul(beta2, V::load(v + i)));
      const V::F denom = V::add(V::sqrt(v2), eps);
      V::F x = V::load(p + i);
      if (MODE == kClip) x = V::fma(nc, V::clamp(x, lo, hi), x);
      x = V::fma(step, V::div(m2, denom), x);
      if (MODE == kProx) x = V::fma(nc, V::clamp(x, lo, hi), x);
      V::store(p + i, x);
      V::store(m + i, m2);
      V::store(v + i, v2);
      if (SUMS) s[k] = V::fma(V::abs(x), scale, s[k]);
    }
  }
  if (SUMS)
    for (int k = 0; k < kVecs; ++k) V::store(out_sums + k * V::W, s[k]);
  uint32_t t = 0;
  if (NEXT && SCALE)
    for (int k = 0; k < kVecs; ++k) t = std::max(t, V::hmaxu(top[k]));
  if (NEXT && !SCALE)  // (one fma per vector instead of an and and a max; finite_top<false> reads only t < inf)
    for (int k = 0; k < kVecs; ++k) t = std::max(t, V::nan_any(zsum[k]) ? 0x7FC00000u : 0u);
  return t;
}
#endif

// One contiguous piece [0, n) of one tensor. Returns the non-finite count. With partials (one slot per block), the
// piece starts at a block boundary of its tensor and partials[k] receives block k's sum of the stored |p|.
// The piece is updated in ranges of kSumSub elements: a range whose gradients are all finite (checked before it is
// updated) takes the loop without masks; the statistic of a range is taken right behind its update (still in L1).
template <typename P, typename G, typename S, int MODE, bool SCALE>
int64_t step_piece(P* __restrict p, const G* __restrict g, S* __restrict m, S* __restrict v, S* __restrict vm,
                   int64_t n, const Scalars& sc, const TensorScalars& ts, double* __restrict partials) {
  LoopConsts c;
  c.lerp_mask = sc.lerp_low ? 0xFFFFFFFFu : 0u;
  c.lerp_low = sc.lerp_low;
  c.lerp_coef = sc.lerp_coef;
  c.beta2 = sc.beta2;
  c.omb2 = sc.one_minus_beta2;
  c.gs = sc.grad_scale;
  c.neg_c = sc.neg_decay_c;
  c.eps_bc = ts.eps_bc;
  c.neg_step_bc = ts.neg_step_bc;
  c.hi = ts.decay_hi;
  c.lo = -ts.decay_hi;
  const bool sums = partials != nullptr;
  // ok: the range starting at i has only finite gradients (and lerp_low holds)
  auto check = [&](int64_t i) {
    return c.lerp_low && i < n && all_finite<G, SCALE>(g, i, std::min(n, i + kSumSub), c.gs);
  };
  bool ok = check(0);
  int64_t bad_total = 0;
  for (int64_t b0 = 0, k = 0; b0 < n; b0 += kSumBlock, ++k) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    BlockSum acc;
    for (int64_t i = b0; i < b1; i += kSumSub) {
      const int64_t e = std::min(b1, i + kSumSub);
      if (vm != nullptr) {  // amsgrad: portable code only
        bad_total += update_range_ams<P, G, S, MODE, SCALE>(p, g, m, v, vm, i, e, c, ok);
        if (sums) acc.add(p + i, e - i);
        ok = check(e);
        continue;
      }
#if ADAMHD_SIMD
      if constexpr (std::is_same_v<P, float> && std::is_same_v<G, float> && std::is_same_v<S, float>) {
        if (ok && e - i == kSumSub) {
          alignas(64) float s[kSumLanes];
          const bool next_whole = n - e >= kSumSub;
          if (next_whole) {
            const uint32_t top = sums ? simd_range<MODE, SCALE, true, true>(p, g, m, v, i, c, s)
                                      : simd_range<MODE, SCALE, false, true>(p, g, m, v, i, c, s);
            ok = finite_top<SCALE>(top, c.gs);
          } else {
            if (sums) simd_range<MODE, SCALE, true, false>(p, g, m, v, i, c, s);
            else simd_range<MODE, SCALE, false, false>(p, g, m, v, i, c, s);
            ok = check(e);
          }
          if (sums) acc.add_lanes(s);
          continue;
        }
      }
#endif
      bad_total += update_range<P, G, S, MODE, SCALE>(p, g, m, v, i, e, c, ok);
      if (sums) acc.add(p + i, e - i);
      ok = check(e);
    }
    if (sums) partials[k] = acc.finish();
  }
  return bad_total;
}

// Dtype codes: 0 = float32, 1 = bfloat16.
inline int dtype_code(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kFloat) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "adamhd cpu kernel: ", what, " must be float32 or bfloat16, got ", t.scalar_type());
  return -1;
}

using PieceFn = int64_t (*)(void*, const void*, void*, void*, void*, int64_t, const Scalars&,
                           const TensorScalars&, double*);

template <typename P, typename G, typename S, int MODE, bool SCALE>
int64_t piece_erased(void* p, const void* g, void* m, void* v, void* vm, int64_t n, const Scalars& sc,
                     const TensorScalars& ts, double* partials) {
  return step_piece<P, G, S, MODE, SCALE>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<S*>(m),
                                          static_cast<S*>(v), static_cast<S*>(vm), n, sc, ts, partials);
}

// Block partials of one block-aligned piece (abs_sums).
using SumPieceFn = void (*)(const void*, int64_t, double*);

template <typename T>
void sum_piece(const void* x, int64_t n, double* partials) {
  const T* t = static_cast<const T*>(x);
  for (int64_t b0 = 0, k = 0; b0 < n; b0 += kSumBlock, ++k) partials[k] = block_abs_sum<T>(t + b0, std::min(n - b0, kSumBlock));
}

template <int MODE, bool SCALE>
PieceFn pick_types(int pc, int gc, int sc) {
  const int k = pc * 4 + gc * 2 + sc;
  switch (k) {
    case 0: return &piece_erased<float, float, float, MODE, SCALE>;
    case 1: return &piece_erased<float, float, bf16_raw, MODE, SCALE>;
    case 2: return &piece_erased<float, bf16_raw, float, MODE, SCALE>;
    case 3: return &piece_erased<float, bf16_raw, bf16_raw, MODE, SCALE>;
    case 4: return &piece_erased<bf16_raw, float, float, MODE, SCALE>;
    case 5: return &piece_erased<bf16_raw, float, bf16_raw, MODE, SCALE>;
    case 6: return &piece_erased<bf16_raw, bf16_raw, float, MODE, SCALE>;
    default: return &piece_erased<bf16_raw, bf16_raw, bf16_raw, MODE, SCALE>;
  }
}

PieceFn pick(int mode, bool scale, int pc, int gc, int sc) {
  if (scale) {
    if (mode == kProx) return pick_types<kProx, true>(pc, gc, sc);
    if (mode == kClip) return pick_types<kClip, true>(pc, gc, sc);
    return pick_types<kNone, true>(pc, gc, sc);
  }
  if (mode == kProx) return pick_types<kProx, false>(pc, gc, sc);
  if (mode == kClip) return pick_types<kClip, false>(pc, gc, sc);
  return pick_types<kNone, false>(pc, gc, sc);
}

struct Job {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vm;  // max_exp_avg_sq (amsgrad), else nullptr
  int64_t elem_p, elem_g, elem_s;  // element sizes in bytes, for offsetting
  PieceFn fn;
  TensorScalars ts;
  size_t index;    // position in the argument lists
  int64_t pbase;   // first block partial of this tensor
  int64_t blocks;  // number of blocks
};

// Checks abs_sums_out (float64, contiguous CPU, one entry per tensor).
void check_sums_out(const at::Tensor& t, size_t nt) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous() &&
                  t.numel() == static_cast<int64_t>(nt),
              "adamhd cpu kernel: abs_sums_out must be a contiguous float64 CPU tensor with one entry per tensor");
}

}  // namespace

// decay_mode: 0 = none, 1 = prox, 2 = clip. grad_scale == 1 means "no scaling" (dividing by 1 is exact).
int64_t adamhd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<double>& step_sizes, const std::vector<double>& bc2_sqrts,
                    const std::vector<double>& deltas, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t decay_mode, double grad_scale,
                    const std::optional<at::Tensor>& abs_sums_out,
                    const std::vector<at::Tensor>& max_exp_avg_sqs) {
  const size_t nt = params.size();
  const bool ams = !max_exp_avg_sqs.empty();
  TORCH_CHECK(!ams || max_exp_avg_sqs.size() == nt,
              "adamhd cpu kernel: max_exp_avg_sqs needs one tensor per param (or none)");
  if (abs_sums_out.has_value()) check_sums_out(*abs_sums_out, nt);
  TORCH_CHECK(grads.size() == nt && exp_avgs.size() == nt && exp_avg_sqs.size() == nt,
              "adamhd cpu kernel: params, grads, exp_avgs, exp_avg_sqs must have the same length");
  TORCH_CHECK(step_sizes.size() == nt && bc2_sqrts.size() == nt,
              "adamhd cpu kernel: step_sizes and bc2_sqrts need one entry per tensor");
  const double tau_d = lr * weight_decay;
  int mode = static_cast<int>(decay_mode);
  TORCH_CHECK(mode == kNone || mode == kProx || mode == kClip, "adamhd cpu kernel: bad decay mode ", mode);
  if (tau_d == 0.0) mode = kNone;
  TORCH_CHECK(mode == kNone || deltas.size() == nt, "adamhd cpu kernel: deltas needs one entry per tensor");
  const bool scale = grad_scale != 1.0;

  Scalars sc;
  const float w = static_cast<float>(1.0 - beta1);
  sc.lerp_low = std::abs(w) < 0.5f;
  sc.lerp_coef = sc.lerp_low ? w : -(1.0f - w);
  sc.beta2 = static_cast<float>(beta2);
  sc.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  sc.neg_decay_c = static_cast<float>(mode == kProx ? -tau_d / (1.0 + tau_d) : -tau_d);
  sc.grad_scale = scale ? static_cast<float>(grad_scale) : 1.0f;

  std::vector<Job> jobs;
  std::vector<int64_t> starts;  // start of job j in the virtual concatenated range
  jobs.reserve(nt);
  starts.reserve(nt + 1);
  int64_t total = 0;
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(p.device().is_cpu() && g.device().is_cpu() && m.device().is_cpu() && v.device().is_cpu(),
                "adamhd cpu kernel: tensor ", i, " is not on the CPU");
    const int64_t n = p.numel();
    TORCH_CHECK(g.numel() == n && m.numel() == n && v.numel() == n, "adamhd cpu kernel: tensor ", i,
                ": param, grad, exp_avg, exp_avg_sq sizes differ");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(),
                "adamhd cpu kernel: tensor ", i, " is not contiguous");
    const int pc = dtype_code(p, "param");
    const int gc = dtype_code(g, "grad");
    const int mc = dtype_code(m, "exp_avg");
    const int vc = dtype_code(v, "exp_avg_sq");
    TORCH_CHECK(mc == vc, "adamhd cpu kernel: tensor ", i, ": exp_avg and exp_avg_sq dtypes differ");
    if (ams) {
      const at::Tensor& vm = max_exp_avg_sqs[i];
      TORCH_CHECK(vm.device().is_cpu() && vm.numel() == n && vm.is_contiguous(), "adamhd cpu kernel: tensor ", i,
                  ": max_exp_avg_sq must be a contiguous CPU tensor of the param's size");
      TORCH_CHECK(dtype_code(vm, "max_exp_avg_sq") == vc, "adamhd cpu kernel: tensor ", i,
                  ": max_exp_avg_sq and exp_avg_sq dtypes differ");
    }
    if (n == 0) continue;
    Job j;
    j.p = p.data_ptr();
    j.g = g.data_ptr();
    j.m = m.data_ptr();
    j.v = v.data_ptr();
    j.vm = ams ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    j.elem_p = p.element_size();
    j.elem_g = g.element_size();
    j.elem_s = m.element_size();
    j.fn = pick(mode, scale, pc, gc, mc);
    const double delta = mode == kNone ? 0.0 : deltas[i];
    TORCH_CHECK(delta >= 0.0, "adamhd cpu kernel: tensor ", i, ": delta must be >= 0 (or +inf)");
    j.ts.neg_step_bc = static_cast<float>(-step_sizes[i] * bc2_sqrts[i]);
    j.ts.eps_bc = static_cast<float>(eps * bc2_sqrts[i]);
    j.ts.decay_hi = static_cast<float>(mode == kProx ? (1.0 + tau_d) * delta : delta);
    j.index = i;
    j.blocks = num_blocks(n);
    j.pbase = jobs.empty() ? 0 : jobs.back().pbase + jobs.back().blocks;
    jobs.push_back(j);
    starts.push_back(total);
    total += n;
  }
  starts.push_back(total);

  const bool want_sums = abs_sums_out.has_value();
  std::vector<double> partials(want_sums && !jobs.empty() ? jobs.back().pbase + jobs.back().blocks : 0);
  std::atomic<int64_t> bad_total{0};
  // Grain: below this many elements a chunk is not worth a thread. Threads split at block boundaries (an element's
  // update does not depend on the split; the block sums need whole blocks).
  constexpr int64_t kGrain = 1 << 15;
  parallel_block_pieces(starts, kGrain, [&](size_t jj, int64_t off, int64_t n) {
    const Job& job = jobs[jj];
    const int64_t bad = job.fn(static_cast<char*>(job.p) + off * job.elem_p,
                               static_cast<const char*>(job.g) + off * job.elem_g,
                               static_cast<char*>(job.m) + off * job.elem_s,
                               static_cast<char*>(job.v) + off * job.elem_s,
                               job.vm ? static_cast<char*>(job.vm) + off * job.elem_s : nullptr, n, sc, job.ts,
                               want_sums ? partials.data() + job.pbase + off / kSumBlock : nullptr);
    if (bad) bad_total.fetch_add(bad, std::memory_order_relaxed);
  });
  if (want_sums) {
    const at::Tensor& out = *abs_sums_out;
    double* o = out.data_ptr<double>();
    std::fill(o, o + nt, 0.0);  // empty tensors
    for (const Job& job : jobs) o[job.index] = combine_partials(partials.data() + job.pbase, job.blocks);
    if (nt > 0 && !out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
  }
  // Written in place: bump the version counters as torch's in-place ops do (autograd / compile guards).
  for (size_t i = 0; i < nt; ++i) {
    for (const at::Tensor* t : {&params[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      if (t->numel() > 0 && !t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    }
    if (ams && max_exp_avg_sqs[i].numel() > 0 && !max_exp_avg_sqs[i].is_inference())
      max_exp_avg_sqs[i].unsafeGetTensorImpl()->bump_version();
  }
  return bad_total.load();
}

// Σ|x| of each tensor (float32 / bfloat16, contiguous CPU; empty -> 0), as a float64 tensor (N,). The summation order
// depends only on each tensor's numel and values (see the top of this file); identical to adamhd_step's abs_sums_out.
at::Tensor abs_sums(const std::vector<at::Tensor>& tensors) {
  const size_t nt = tensors.size();
  struct SumJob {
    const void* x;
    SumPieceFn fn;
    int64_t elem;
    size_t index;
    int64_t pbase;
    int64_t blocks;
  };
  std::vector<SumJob> jobs;
  std::vector<int64_t> starts;
  jobs.reserve(nt);
  starts.reserve(nt + 1);
  int64_t total = 0, nblocks = 0;
  for (size_t i = 0; i < nt; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "adamhd cpu abs_sums: tensor ", i, " is not on the CPU");
    TORCH_CHECK(t.is_contiguous(), "adamhd cpu abs_sums: tensor ", i, " is not contiguous");
    const int code = dtype_code(t, "tensor");
    const int64_t n = t.numel();
    if (n == 0) continue;
    SumJob j;
    j.x = t.data_ptr();
    j.fn = code == 0 ? &sum_piece<float> : &sum_piece<bf16_raw>;
    j.elem = t.element_size();
    j.index = i;
    j.pbase = nblocks;
    j.blocks = num_blocks(n);
    nblocks += j.blocks;
    jobs.push_back(j);
    starts.push_back(total);
    total += n;
  }
  starts.push_back(total);
  at::Tensor out = at::zeros({static_cast<int64_t>(nt)}, at::TensorOptions().dtype(at::kDouble));
  std::vector<double> partials(nblocks);
  constexpr int64_t kGrain = 1 << 16;
  parallel_block_pieces(starts, kGrain, [&](size_t jj, int64_t off, int64_t n) {
    const SumJob& job = jobs[jj];
    job.fn(static_cast<const char*>(job.x) + off * job.elem, n, partials.data() + job.pbase + off / kSumBlock);
  });
  double* o = out.data_ptr<double>();
  for (const SumJob& job : jobs) o[job.index] = combine_partials(partials.data() + job.pbase, job.blocks);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Fused multi-tensor AdamHD step for CPU tensors (fp32 / bf16 storage, fp32 math)";
  mod.def("adamhd_step", &adamhd_step, "In-place fused AdamHD step over lists of CPU tensors; returns the number "
          "of non-finite gradient elements (whose p/m/v were left unchanged)",
          py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step_sizes"),
          py::arg("bc2_sqrts"), py::arg("deltas"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("decay_mode"), py::arg("grad_scale"),
          py::arg("abs_sums_out") = py::none(), py::arg("max_exp_avg_sqs") = std::vector<at::Tensor>(),
          py::call_guard<py::gil_scoped_release>());
  mod.attr("SUM_BLOCK") = kSumBlock;
  mod.attr("SUM_SUB") = kSumSub;
  mod.attr("SUM_LANES") = kSumLanes;
  mod.attr("SIMD_PATH") = kPathName;  // which code the build has for the fp32 update: "avx512", "avx2" or "portable"
  mod.def("abs_sums", &abs_sums, "Sum of |x| of each CPU tensor (float32 / bfloat16, contiguous) as a float64 tensor, "
          "in a fixed summation order that depends only on each tensor's numel and values", py::arg("tensors"),
          py::call_guard<py::gil_scoped_release>());
}
