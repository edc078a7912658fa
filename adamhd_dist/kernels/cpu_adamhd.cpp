// Fused multi-tensor AdamHD step for CPU tensors (AdamW with a decoupled Huber decay).
//
// One call updates a whole list of tensors: the lists are laid end to end as one virtual element range,
// that range is split over torch's intra-op thread pool (at::parallel_for), and each thread walks the
// tensors its sub-range touches. The inner loop is branch-free and vectorised by the compiler
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
// Built without -ffast-math: infinities and NaNs follow IEEE rules. Built with -ffp-contract=off: no implicit FMA,
// so an element's result does not depend on whether it lands in the vector body or a scalar remainder (i.e. on
// the thread split or the offset of a view) — every op is one IEEE fp32 op, in the order written.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstring>
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

// The vectorised loop over one contiguous piece [0, n) of one tensor. Returns the non-finite count.
template <typename P, typename G, typename S, int MODE, bool SCALE>
int64_t step_piece(P* __restrict p, const G* __restrict g, S* __restrict m, S* __restrict v, int64_t n,
                   const Scalars& sc, const TensorScalars& ts) {
  const uint32_t lerp_mask = sc.lerp_low ? 0xFFFFFFFFu : 0u;
  const float lerp_coef = sc.lerp_coef;
  const float beta2 = sc.beta2;
  const float omb2 = sc.one_minus_beta2;
  const float eps = sc.eps;
  const float tau = sc.tau;
  const float opt = sc.one_plus_tau;
  const float gs = sc.grad_scale;
  const float step = ts.step_size;
  const float bc2 = ts.bc2_sqrt;
  const float delta = ts.delta;
  const float ndelta = -ts.delta;

  int64_t bad_total = 0;
  constexpr int64_t kBlock = 1 << 16;  // int32 counter per block keeps the simd reduction narrow
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
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
        const float c = std::min(std::max(x, ndelta), delta);
        x = x - tau * c;
      }
      x = x - step * (m2 / denom);
      if (MODE == kProx) {
        const float y = x / opt;
        const float c = std::min(std::max(y, ndelta), delta);
        x = x - tau * c;
      }

      const bool fin = std::abs(gi) <= FLT_MAX;  // false for +-inf and NaN
      bad += fin ? 0 : 1;
      p[i] = Store<P>::select(fin, x, p[i]);
      m[i] = Store<S>::select(fin, m2, m[i]);
      v[i] = Store<S>::select(fin, v2, v[i]);
    }
    bad_total += bad;
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

using PieceFn = int64_t (*)(void*, const void*, void*, void*, int64_t, const Scalars&, const TensorScalars&);

template <typename P, typename G, typename S, int MODE, bool SCALE>
int64_t piece_erased(void* p, const void* g, void* m, void* v, int64_t n, const Scalars& sc,
                     const TensorScalars& ts) {
  return step_piece<P, G, S, MODE, SCALE>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<S*>(m),
                                          static_cast<S*>(v), n, sc, ts);
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
};

}  // namespace

// decay_mode: 0 = none, 1 = prox, 2 = clip. grad_scale == 1 means "no scaling" (dividing by 1 is exact).
int64_t adamhd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<double>& step_sizes, const std::vector<double>& bc2_sqrts,
                    const std::vector<double>& deltas, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t decay_mode, double grad_scale) {
  const size_t nt = params.size();
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
    jobs.push_back(j);
    starts.push_back(total);
    total += n;
  }
  starts.push_back(total);
  if (total == 0) return 0;

  std::atomic<int64_t> bad_total{0};
  // Grain: below this many elements a chunk is not worth a thread.
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // First job whose range contains `begin`.
    size_t j = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
    int64_t bad = 0;
    int64_t pos = begin;
    while (pos < end && j < jobs.size()) {
      const Job& job = jobs[j];
      const int64_t off = pos - starts[j];
      const int64_t stop = std::min(end, starts[j + 1]);
      const int64_t n = stop - pos;
      bad += job.fn(static_cast<char*>(job.p) + off * job.elem_p, static_cast<const char*>(job.g) + off * job.elem_g,
                    static_cast<char*>(job.m) + off * job.elem_s, static_cast<char*>(job.v) + off * job.elem_s, n,
                    sc, job.ts);
      pos = stop;
      ++j;
    }
    if (bad) bad_total.fetch_add(bad, std::memory_order_relaxed);
  });
  // Written in place: bump the version counters as torch's in-place ops do (autograd / compile guards).
  for (size_t i = 0; i < nt; ++i) {
    for (const at::Tensor* t : {&params[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      if (t->numel() > 0 && !t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    }
  }
  return bad_total.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Fused multi-tensor AdamHD step for CPU tensors (fp32 / bf16 storage, fp32 math)";
  mod.def("adamhd_step", &adamhd_step, "In-place fused AdamHD step over lists of CPU tensors; returns the number "
          "of non-finite gradient elements (whose p/m/v were left unchanged)",
          py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step_sizes"),
          py::arg("bc2_sqrts"), py::arg("deltas"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("decay_mode"), py::arg("grad_scale"),
          py::call_guard<py::gil_scoped_release>());
}
