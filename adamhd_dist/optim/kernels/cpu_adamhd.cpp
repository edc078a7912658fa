// Fused multi-tensor AdamHD step for CPU tensors (AdamW with a decoupled Huber decay).
//
// One call updates a whole list of tensors: the lists are laid end to end as one virtual element range,
// that range is split over torch's intra-op thread pool (at::parallel_for), and each thread walks the
// tensors its sub-range touches (rounded to whole kSumBlock blocks of each tensor, see below). The inner loop is branch-free and vectorised by the compiler
// (#pragma omp simd, -O3 -march=native); storage dtypes (fp32 / bf16) are template parameters, all math
// is fp32, stores round to nearest even (as torch's .to(torch.bfloat16)).
//
// Per element (tau = lr * weight_decay):
//   g  = grad / grad_scale
//   m2 = lerp(m, g, 1 - beta1)             (torch.lerp's two-sided form)
//   v2 = beta2 * v + (1 - beta2) * g * g
//   x  = p
//   clip:  x -= tau * clamp(x, -delta, delta)
//   x -= step_size * m2 / (sqrt(v2) / bc2_sqrt + eps)
//   prox:  x -= tau * clamp(x / (1 + tau), -delta, delta)
//   if g is finite: store x, m2, v2; else leave p, m, v bit-for-bit unchanged and count the element.
//
// Layer statistic Σ|x| (the AdamHD delta needs each layer's mean |θ|): `abs_sums` computes it for a list of tensors, and
// `adamhd_step` can emit it for the values it just stored (abs_sums_out), in the same pass. Both use ONE summation
// order, which depends only on the tensor's numel and values (never on its address, the thread count or split):
//   * the tensor is cut into blocks of kSumBlock elements counted from its own first element;
//   * within a block, |x| (exact fp32 -> double) is added into kSumLanes double lanes, element i into lane i % kSumLanes
//     (a short final group is zero-padded to a full group: +0.0 leaves a lane unchanged), lanes combined by a fixed tree;
//   * the tensor's sum = 0.0 + partial(block 0) + partial(block 1) + ..., sequentially in block order.
// Work is split between threads at block boundaries (a block is always done whole by one thread), partials are stored
// per block and combined after the parallel region, so the result is bitwise reproducible. The fused update feeds the
// values it has just stored (still in L1, every kSumSub elements) to the same lane accumulator in the same order, so
// abs_sums_out == abs_sums(params) bit for bit.
//
// Built without -ffast-math: infinities and NaNs follow IEEE rules. Built with -ffp-contract=off: no implicit FMA,
// so an element's result does not depend on whether it lands in the vector body or a scalar remainder (i.e. on
// the thread split or the offset of a view) — every op is one IEEE fp32 op, in the order written.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#pragma STDC FP_CONTRACT OFF

namespace {

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
  static inline float select(bool keep_new, float x, float old) { return keep_new ? x : old; }
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
  static inline bf16_raw select(bool keep_new, float x, bf16_raw old) {
    const uint32_t keep = 0u - static_cast<uint32_t>(keep_new);
    return static_cast<bf16_raw>((round(x) & keep) | (static_cast<uint32_t>(old) & ~keep));
  }
};

struct Scalars {
  float beta1_w;      // lerp weight 1 - beta1
  bool lerp_low;      // weight < 0.5: m + w*(g-m); else g - (g-m)*(1-w)
  float lerp_coef;    // w, or -(1 - w)
  float beta2;
  float one_minus_beta2;
  float eps;
  float tau;
  float one_plus_tau;
  float grad_scale;
};

struct TensorScalars {
  float step_size;
  float bc2_sqrt;
  float delta;
};

// ---------------------------------------------------------------------------------------------------------------
// Deterministic block sum of |x|. The order of every addition is fixed (the code below only changes how it is
// computed for the ISA at hand, never the order): each |x| is converted exactly to double; 32 double lanes,
//   L[l] = (((0 + |x[l]|) + |x[32 + l]|) + |x[64 + l]|) + ...      (l = i % 32; a short last group is zero padded)
//   t[j] = (L[j] + L[8 + j]) + (L[16 + j] + L[24 + j])                                  (j < 8)
//   sum  = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
// Implementations: vectors of 4 doubles (AVX: accumulator k holds lanes 4k..4k+3), vectors of 8 doubles (AVX-512, bf16;
// and the portable GCC vector-extension fallback). Each vector op is lane-wise IEEE arithmetic, so all give the same
// bits; exact |x| -> double conversions and IEEE adds (no FMA, no reassociation) make that ISA independent.
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kSumBlock = 2048;  // elements per block (multiple of kSumLanes)
constexpr int kSumLanes = 32;
// The fused update sums what it stored every kSumSub elements (measured: 32 / 256 / 2048 all within noise).
constexpr int64_t kSumSub = 256;

#if defined(__AVX__)
// 8 x 4 doubles. float: one vcvtps2pd per 4 elements; bf16: zero-extend, shift into the high half, convert.
template <typename T>
struct SumAcc4 {
  __m256d a[8];
  SumAcc4() {
    for (auto& q : a) q = _mm256_setzero_pd();
  }
  static inline __m256d load4(const float* x) { return _mm256_cvtps_pd(_mm_loadu_ps(x)); }
  static inline __m256d load4(const bf16_raw* x) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
  }
  inline void add32(const T* x) {
    const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll));
    for (int k = 0; k < 8; ++k) a[k] = _mm256_add_pd(a[k], _mm256_and_pd(load4(x + 4 * k), abs_mask));
  }
  inline double finish() const {
    const __m256d lo = _mm256_add_pd(_mm256_add_pd(a[0], a[2]), _mm256_add_pd(a[4], a[6]));  // t[0..4)
    const __m256d hi = _mm256_add_pd(_mm256_add_pd(a[1], a[3]), _mm256_add_pd(a[5], a[7]));  // t[4..8)
    alignas(32) double u[4];
    _mm256_store_pd(u, _mm256_add_pd(lo, hi));  // u[j] = t[j] + t[j + 4]
    return (u[0] + u[2]) + (u[1] + u[3]);
  }
};
#endif

#if defined(__AVX512F__)
// 4 x 8 doubles, for bf16 (zero-extend + shift + one vcvtps2pd zmm per 8 elements is cheaper than the 4-wide path).
struct SumAcc8Bf16 {
  __m512d a[4];
  SumAcc8Bf16() {
    for (auto& q : a) q = _mm512_setzero_pd();
  }
  static inline __m512d load8(const bf16_raw* x) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  inline void add32(const bf16_raw* x) {
    const __m512d abs_mask = _mm512_castsi512_pd(_mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll));
    for (int k = 0; k < 4; ++k) a[k] = _mm512_add_pd(a[k], _mm512_and_pd(load8(x + 8 * k), abs_mask));
  }
  inline double finish() const {
    alignas(64) double t[8];
    _mm512_store_pd(t, _mm512_add_pd(_mm512_add_pd(a[0], a[1]), _mm512_add_pd(a[2], a[3])));
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
  }
};
#endif

// Portable fallback: GCC vector extensions, 4 x 8 doubles.
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

template <typename T>
struct SumAccGeneric {
  v8d a[4] = {};
  // (accumulate through a reference: no 64-byte vectors passed by value, which -Wpsabi flags on non-AVX-512 builds)
  static inline void add8(v8d& a, const float* x) {
    v8u u;
    std::memcpy(&u, x, sizeof(u));
    u &= 0x7FFFFFFFu;
    a += __builtin_convertvector((v8f)u, v8d);
  }
  static inline void add8(v8d& a, const bf16_raw* x) {
    v8h h;
    std::memcpy(&h, x, sizeof(h));
    v8u u = __builtin_convertvector(h, v8u) << 16;
    u &= 0x7FFFFFFFu;
    a += __builtin_convertvector((v8f)u, v8d);
  }
  inline void add32(const T* x) {
    for (int k = 0; k < 4; ++k) add8(a[k], x + 8 * k);
  }
  inline double finish() const {
    const v8d t = (a[0] + a[1]) + (a[2] + a[3]);
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
  }
};

template <typename T>
struct SumAccFor {
#if defined(__AVX__)
  using type = SumAcc4<T>;
#else
  using type = SumAccGeneric<T>;
#endif
};
#if defined(__AVX512F__)
template <>
struct SumAccFor<bf16_raw> {
  using type = SumAcc8Bf16;
};
#endif

// Σ|x[0..n)| for one block, 0 < n <= kSumBlock, in the fixed order above.
template <typename T, typename Acc = typename SumAccFor<T>::type>
double block_abs_sum(const T* __restrict x, int64_t n) {
  static_assert(kSumBlock % kSumLanes == 0, "blocks hold whole lane groups");
  Acc acc;
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) acc.add32(x + i);
  if (i < n) {  // last partial group, zero padded: raw zero is +0.0 (fp32 and bf16), and L + 0.0 == L
    T tail[kSumLanes];
    std::memset(tail, 0, sizeof(tail));
    std::memcpy(tail, x + i, static_cast<size_t>(n - i) * sizeof(T));
    acc.add32(tail);
  }
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
  uint32_t lerp_mask;
  float lerp_coef, beta2, omb2, eps, tau, opt, gs, step, bc2, delta, ndelta;
};

// The vectorised update of elements [b0, b1) of one tensor. Returns the non-finite count (int32: keeps the simd
// reduction narrow).
template <typename P, typename G, typename S, int MODE, bool SCALE>
inline __attribute__((always_inline)) int32_t update_range(P* __restrict p, const G* __restrict g, S* __restrict m,
                                                           S* __restrict v, int64_t b0, int64_t b1, const LoopConsts c) {
  const uint32_t lerp_mask = c.lerp_mask;
  const float lerp_coef = c.lerp_coef;
  const float beta2 = c.beta2;
  const float omb2 = c.omb2;
  const float eps = c.eps;
  const float tau = c.tau;
  const float opt = c.opt;
  const float gs = c.gs;
  const float step = c.step;
  const float bc2 = c.bc2;
  const float delta = c.delta;
  const float ndelta = c.ndelta;
  int32_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = b0; i < b1; ++i) {
    float gi = Store<G>::load(g[i]);
    if (SCALE) gi = gi / gs;
    const float mi = Store<S>::load(m[i]);
    const float vi = Store<S>::load(v[i]);
    const float pi = Store<P>::load(p[i]);

    const float diff = gi - mi;
    // base = lerp_low ? mi : gi, as a bit select: GCC will not vectorise a ?: on a loop-invariant bool in
    // loops that mix 16- and 32-bit element types.
    const float base = bits_to_float((float_to_bits(mi) & lerp_mask) | (float_to_bits(gi) & ~lerp_mask));
    const float m2 = base + lerp_coef * diff;
    const float v2 = beta2 * vi + omb2 * gi * gi;
    const float denom = std::sqrt(v2) / bc2 + eps;

    float x = pi;
    if (MODE == kClip) {
      const float cl = std::min(std::max(x, ndelta), delta);
      x = x - tau * cl;
    }
    x = x - step * (m2 / denom);
    if (MODE == kProx) {
      const float y = x / opt;
      const float cl = std::min(std::max(y, ndelta), delta);
      x = x - tau * cl;
    }

    const bool fin = std::abs(gi) <= FLT_MAX;  // false for +-inf and NaN
    bad += fin ? 0 : 1;
    p[i] = Store<P>::select(fin, x, p[i]);
    m[i] = Store<S>::select(fin, m2, m[i]);
    v[i] = Store<S>::select(fin, v2, v[i]);
  }
  return bad;
}

// One contiguous piece [0, n) of one tensor. Returns the non-finite count. With partials (one slot per block), the
// piece starts at a block boundary of its tensor and partials[k] receives block k's sum of the stored |p|.
template <typename P, typename G, typename S, int MODE, bool SCALE>
int64_t step_piece(P* __restrict p, const G* __restrict g, S* __restrict m, S* __restrict v, int64_t n,
                   const Scalars& sc, const TensorScalars& ts, double* __restrict partials) {
  LoopConsts c;
  c.lerp_mask = sc.lerp_low ? 0xFFFFFFFFu : 0u;
  c.lerp_coef = sc.lerp_coef;
  c.beta2 = sc.beta2;
  c.omb2 = sc.one_minus_beta2;
  c.eps = sc.eps;
  c.tau = sc.tau;
  c.opt = sc.one_plus_tau;
  c.gs = sc.grad_scale;
  c.step = ts.step_size;
  c.bc2 = ts.bc2_sqrt;
  c.delta = ts.delta;
  c.ndelta = -ts.delta;
  auto update = [=](int64_t b0, int64_t b1) { return update_range<P, G, S, MODE, SCALE>(p, g, m, v, b0, b1, c); };

  int64_t bad_total = 0;
  if (partials == nullptr) {
    constexpr int64_t kChunk = 1 << 16;
    for (int64_t b0 = 0; b0 < n; b0 += kChunk) bad_total += update(b0, std::min(n, b0 + kChunk));
    return bad_total;
  }
  // With partials: the piece starts at a block boundary of its tensor. The stored values are summed right behind the
  // update, every kSumSub elements (still in L1, interleaved with the update's memory traffic), into the lanes of
  // the block's accumulator: the same lane order as block_abs_sum (whole groups of kSumLanes from the block start,
  // then the zero-padded last group), so partials[k] is bitwise what abs_sums computes for that block.
  using Acc = typename SumAccFor<P>::type;
  static_assert(kSumSub % kSumLanes == 0 && kSumBlock % kSumSub == 0, "sub-chunks hold whole lane groups");
  for (int64_t b0 = 0, k = 0; b0 < n; b0 += kSumBlock, ++k) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    Acc acc;
    int32_t bad = 0;
    int64_t i = b0;
    for (; i + kSumSub <= b1; i += kSumSub) {
      bad += update(i, i + kSumSub);
      for (int64_t j = 0; j < kSumSub; j += kSumLanes) acc.add32(p + i + j);
    }
    if (i < b1) {
      bad += update(i, b1);
      for (; i + kSumLanes <= b1; i += kSumLanes) acc.add32(p + i);
      if (i < b1) {
        P tail[kSumLanes];
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, p + i, static_cast<size_t>(b1 - i) * sizeof(P));
        acc.add32(tail);
      }
    }
    bad_total += bad;
    partials[k] = acc.finish();
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

using PieceFn = int64_t (*)(void*, const void*, void*, void*, int64_t, const Scalars&, const TensorScalars&,
                           double*);

template <typename P, typename G, typename S, int MODE, bool SCALE>
int64_t piece_erased(void* p, const void* g, void* m, void* v, int64_t n, const Scalars& sc,
                     const TensorScalars& ts, double* partials) {
  return step_piece<P, G, S, MODE, SCALE>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<S*>(m),
                                          static_cast<S*>(v), n, sc, ts, partials);
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
                    const std::optional<at::Tensor>& abs_sums_out) {
  const size_t nt = params.size();
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
  sc.beta1_w = w;
  sc.lerp_low = std::abs(w) < 0.5f;
  sc.lerp_coef = sc.lerp_low ? w : -(1.0f - w);
  sc.beta2 = static_cast<float>(beta2);
  sc.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  sc.eps = static_cast<float>(eps);
  sc.tau = static_cast<float>(tau_d);
  sc.one_plus_tau = static_cast<float>(1.0 + tau_d);
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
    if (n == 0) continue;
    Job j;
    j.p = p.data_ptr();
    j.g = g.data_ptr();
    j.m = m.data_ptr();
    j.v = v.data_ptr();
    j.elem_p = p.element_size();
    j.elem_g = g.element_size();
    j.elem_s = m.element_size();
    j.fn = pick(mode, scale, pc, gc, mc);
    j.ts.step_size = static_cast<float>(step_sizes[i]);
    j.ts.bc2_sqrt = static_cast<float>(bc2_sqrts[i]);
    j.ts.delta = mode == kNone ? 0.0f : static_cast<float>(deltas[i]);
    TORCH_CHECK(!(j.ts.delta < 0.0f) && j.ts.delta == j.ts.delta, "adamhd cpu kernel: tensor ", i,
                ": delta must be >= 0 (or +inf)");
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
                               static_cast<char*>(job.v) + off * job.elem_s, n, sc, job.ts,
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
          py::arg("abs_sums_out") = py::none(), py::call_guard<py::gil_scoped_release>());
  mod.attr("SUM_BLOCK") = kSumBlock;
  mod.attr("SUM_LANES") = kSumLanes;
  mod.def("abs_sums", &abs_sums, "Sum of |x| of each CPU tensor (float32 / bfloat16, contiguous) as a float64 tensor, "
          "in a fixed summation order that depends only on each tensor's numel and values", py::arg("tensors"),
          py::call_guard<py::gil_scoped_release>());
}
