// Grouped GEMM over expert-sorted rows, spread over torch's own intra-op thread team.
//
// Hand-written because no maintained library exposes a CPU grouped GEMM with groups of
// different sizes: torch._grouped_mm and nested-tensor bmm run their groups one after
// another, each as a small multi-threaded GEMM, and on two cores MKL threads a
// 128-row GEMM poorly (measured, d=128: 16 GEMMs of 128 rows took 2815 us at 2 threads
// against 1868 us for one GEMM of 2048 rows). Here every thread of at::parallel_for (the same
// OpenMP team torch uses, so no second pool spins against it) runs whole GEMMs,
// single-threaded, on its share of the work (whole expert slices when they balance, see
// plan_whole_slices); only the weight gradient of an expert holding
// more than an even share of the rows runs as one GEMM with all threads (see plan_experts).
// Each GEMM is a plain at::mm / at::addmm, so the arithmetic of every output row is the
// same as in the one-by-one loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

namespace {

// starts[e] = first row of expert e's slice; starts[E] = total rows.
std::vector<int64_t> slice_starts(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> starts(sizes.size() + 1, 0);
  for (size_t e = 0; e < sizes.size(); ++e) starts[e + 1] = starts[e] + sizes[e];
  return starts;
}

struct RowTask {
  int64_t expert, start, rows;
};

// The fallback to plan_whole_slices: splits the sorted rows into one contiguous run per
// thread, cut at expert-slice
// boundaries or inside a slice only where both pieces keep >= min_rows rows (BLAS uses
// other kernels, with other rounding, for matrices of a few rows).
std::vector<std::vector<RowTask>> plan_rows(const std::vector<int64_t>& sizes, int64_t threads,
                                            int64_t min_rows) {
  const std::vector<int64_t> starts = slice_starts(sizes);
  const int64_t total = starts.back();
  std::vector<int64_t> cuts(threads + 1, 0);
  cuts[threads] = total;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t cut = total * t / threads;
    auto it = std::upper_bound(starts.begin(), starts.end(), cut);
    const int64_t s = *(it - 1);
    const int64_t e = (it == starts.end()) ? total : *it;
    if (cut - s < min_rows) cut = s;
    else if (e - cut < min_rows) cut = e;
    cuts[t] = std::max(cut, cuts[t - 1]);
  }
  std::vector<std::vector<RowTask>> plan(threads);
  for (int64_t t = 0; t < threads; ++t) {
    for (size_t e = 0; e < sizes.size(); ++e) {
      const int64_t a = std::max(cuts[t], starts[e]);
      const int64_t b = std::min(cuts[t + 1], starts[e + 1]);
      if (b > a) plan[t].push_back({static_cast<int64_t>(e), a, b - a});
    }
  }
  return plan;
}

// Experts `order` over load.size() threads, largest first to the least-loaded thread (LPT);
// `load` (rows per thread) is updated.
std::vector<std::vector<int64_t>> assign_lpt(std::vector<int64_t> order, const std::vector<int64_t>& sizes,
                                             std::vector<int64_t>& load) {
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  std::vector<std::vector<int64_t>> per_thread(load.size());
  for (int64_t e : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    load[t] += sizes[e];
    per_thread[t].push_back(e);
  }
  return per_thread;
}

// Rows a GEMM's fixed cost (reading and packing its weight) is worth: an expert slice cut in
// two between threads pays it twice, and pieces of half a slice also run at a lower rate per
// row than the whole (measured at d=768 with benchmarks/bench_moe_layer.py). Whole slices are
// kept when the busiest thread then carries at most this many rows over an even share.
constexpr int64_t kSplitCostRows = 32;

// Whole expert slices per thread (LPT), in expert order within a thread; empty when that
// leaves a thread more than kSplitCostRows over an even share (a dominant expert, few
// experts for many threads): then plan_rows cuts slices.
std::vector<std::vector<RowTask>> plan_whole_slices(const std::vector<int64_t>& sizes, int64_t threads) {
  const std::vector<int64_t> starts = slice_starts(sizes);
  const int64_t total = starts.back();
  std::vector<int64_t> order;
  for (size_t e = 0; e < sizes.size(); ++e)
    if (sizes[e] > 0) order.push_back(static_cast<int64_t>(e));
  std::vector<int64_t> load(threads, 0);
  std::vector<std::vector<int64_t>> experts = assign_lpt(order, sizes, load);
  const int64_t even = (total + threads - 1) / threads;
  if (*std::max_element(load.begin(), load.end()) > even + kSplitCostRows) return {};
  std::vector<std::vector<RowTask>> plan(threads);
  for (int64_t t = 0; t < threads; ++t) {
    std::sort(experts[t].begin(), experts[t].end());
    for (int64_t e : experts[t]) plan[t].push_back({e, starts[e], sizes[e]});
  }
  return plan;
}

// Weight-gradient work. An expert holding more than an even share of the rows (a collapsed
// router, a single expert) could not be balanced by any assignment of whole experts: its
// GEMM goes to `shared`, run by the calling thread with all of MKL's threads (the very call
// the one-by-one loop makes, so the same rounding). The other experts go whole to the
// least-loaded thread, largest first (LPT). Such an expert's GEMM is never split by hand:
// splitting its rows would change the summation order, and splitting its columns into
// narrow pieces makes MKL pick kernels that round differently (seen from 4 threads on).
struct ExpertPlan {
  std::vector<int64_t> shared;
  std::vector<std::vector<int64_t>> per_thread;
};

ExpertPlan plan_experts(const std::vector<int64_t>& sizes, int64_t threads) {
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  ExpertPlan plan;
  std::vector<int64_t> order;
  for (size_t e = 0; e < sizes.size(); ++e) {
    if (sizes[e] == 0) continue;
    if (threads > 1 && sizes[e] * threads > total) plan.shared.push_back(static_cast<int64_t>(e));
    else order.push_back(static_cast<int64_t>(e));
  }
  std::vector<int64_t> load(threads, 0);
  plan.per_thread = assign_lpt(order, sizes, load);
  return plan;
}

}  // namespace

// out[slice e] = x[slice e] @ W_e (+ b_e), W_e = weights[e] or its transpose.
// Slices shorter than min_rows are computed zero-padded to min_rows rows.
void grouped_rows_mm(at::Tensor out, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                     const std::vector<at::Tensor>& biases, const std::vector<int64_t>& sizes,
                     bool transpose_weights, int64_t min_rows) {
  TORCH_CHECK(weights.size() == sizes.size(), "one weight per expert");
  TORCH_CHECK(biases.empty() || biases.size() == sizes.size(), "one bias per expert, or none");
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  auto plan = plan_whole_slices(sizes, threads);
  if (plan.empty()) plan = plan_rows(sizes, threads, min_rows);
  // Workers start with default thread-local state; give them the caller's (inference
  // mode, autocast, ...), or writing into an inference tensor would be refused.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard same_state(caller_state);
    at::NoGradGuard no_grad;
    for (int64_t t = begin; t < end; ++t) {
      for (const RowTask& task : plan[t]) {
        const at::Tensor w = transpose_weights ? weights[task.expert].t() : weights[task.expert];
        at::Tensor rows = x.narrow(0, task.start, task.rows);
        at::Tensor dst = out.narrow(0, task.start, task.rows);
        if (task.rows < min_rows) {
          at::Tensor padded = at::zeros({min_rows, x.size(1)}, x.options());
          padded.narrow(0, 0, task.rows).copy_(rows);
          at::Tensor res = biases.empty() ? at::mm(padded, w) : at::addmm(biases[task.expert], padded, w);
          dst.copy_(res.narrow(0, 0, task.rows));
        } else if (biases.empty()) {
          at::mm_out(dst, rows, w);
        } else {
          at::addmm_out(dst, biases[task.expert], rows, w);
        }
      }
    }
  });
}

// Per-expert weight (and bias) gradients of y = x @ W (+ b) from the output gradient g.
// conv1d: W stored [in, out], grad = x_e^T g_e; else [out, in], grad = g_e^T x_e.
// grad_weights[e] / grad_biases[e] are filled for every expert with rows (callers pass
// preallocated tensors; grad_biases may be empty).
void grouped_weight_grads(std::vector<at::Tensor> grad_weights, std::vector<at::Tensor> grad_biases,
                          const at::Tensor& x, const at::Tensor& g, const std::vector<int64_t>& sizes,
                          bool conv1d) {
  TORCH_CHECK(grad_weights.size() == sizes.size(), "one weight gradient per expert");
  const std::vector<int64_t> starts = slice_starts(sizes);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const ExpertPlan plan = plan_experts(sizes, threads);
  auto one_expert = [&](int64_t e) {
    at::Tensor rows = x.narrow(0, starts[e], sizes[e]);
    at::Tensor grad = g.narrow(0, starts[e], sizes[e]);
    if (conv1d) at::mm_out(grad_weights[e], rows.t(), grad);
    else at::mm_out(grad_weights[e], grad.t(), rows);
    if (!grad_biases.empty()) at::sum_out(grad_biases[e], grad, {0});
  };
  {
    at::NoGradGuard no_grad;
    for (int64_t e : plan.shared) one_expert(e);
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard same_state(caller_state);
    at::NoGradGuard no_grad;
    for (int64_t t = begin; t < end; ++t)
      for (int64_t e : plan.per_thread[t]) one_expert(e);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_rows_mm", &grouped_rows_mm, "per-expert (add)mm over expert-sorted rows");
  m.def("grouped_weight_grads", &grouped_weight_grads, "per-expert weight and bias gradients");
}
