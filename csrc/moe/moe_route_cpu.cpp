// CPU kernel of moe_route (schema in registration.cpp, semantics in dsv3_kernels/reference/moe.py).
//
// One token per iteration of a parallel_for over the tokens: scores (sigmoid or softmax, fp32),
// biased scores, group scores, the kept groups and the top experts all live in a per-task scratch
// of a few E floats, so a token is read once and written once. E is at most a few hundred, so the
// selections are plain insertion top-k passes in index order (O(E * k) with an early-out that
// almost always fires). Scores use std::exp (scalar libm, not a vector approximation), so ties
// in the logits stay exact ties; the time goes mostly there. There is no ISA-specific path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "moe/moe_checks.h"

namespace dsv3::moe::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Work per parallel_for task, in logits, so a decode batch does not pay for waking the pool.
constexpr int64_t kGrainElems = 16384;

// a ranks strictly before b in the reference's descending stable sort (torch puts NaN first).
// kNaN = false is the fast path for rows of finite scores, where that is a plain a > b.
template <bool kNaN>
inline bool beats(float a, float b) {
  if constexpr (kNaN) return a > b || (std::isnan(a) && !std::isnan(b));
  else return a > b;
}

// Keeps the k best of the values offered in increasing index order, best first. A value enters
// only if it beats the current k-th and goes after every kept value it does not beat, so equal
// values keep index order: ties go to the lower index, as in the reference's stable sort.
template <bool kNaN>
struct TopK {
  float* val;
  int32_t* idx;
  int64_t k;
  int64_t n = 0;

  void offer(float v, int32_t i) {
    if (n == k && !beats<kNaN>(v, val[k - 1])) return;
    int64_t p = n < k ? n++ : k - 1;  // the slot freed at the end (the old k-th drops out)
    while (p > 0 && beats<kNaN>(v, val[p - 1])) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = i;
  }
};

struct Params {
  int64_t e, n_group, topk_group, topk;
  float scale;
  bool softmax, renormalize;
  const float* bias;  // nullptr without a bias
};

// Scratch of one parallel_for task: scores and biased [E], group scores and kept flags
// [n_group], the top-k values and ids (k <= max(topk_group, topk)).
struct Scratch {
  std::vector<float> scores, biased, group, top_val;
  std::vector<int32_t> top_idx;
  std::vector<char> kept;
  explicit Scratch(const Params& p)
      : scores(p.e), biased(p.e), group(p.n_group), top_val(std::max(p.topk_group, p.topk)),
        top_idx(std::max(p.topk_group, p.topk)), kept(p.n_group) {}
};

// Steps 3 and 4 of the reference on one token's biased scores: topk ids, best first, into ids.
// kNaN = false: every biased score is finite (no NaN to rank first, no -inf to tie with the
// masked experts), which allows branch-free group scores and skipping the masked groups.
template <bool kNaN>
void choose(const float* biased, const Params& p, Scratch& s, int32_t* ids) {
  // 3. Group-limited choice: a group scores its top-2 biased sum (its max without a bias); the
  // topk_group best groups stay, every other expert counts as -inf below.
  const int64_t per_group = p.e / p.n_group;
  std::fill(s.kept.begin(), s.kept.end(), 1);
  if (p.n_group > 1) {
    for (int64_t g = 0; g < p.n_group; ++g) {
      const float* b = biased + g * per_group;
      float m1 = -kInf, m2 = -kInf;
      for (int64_t j = 0; j < per_group; ++j) {
        if constexpr (kNaN) {
          if (beats<true>(b[j], m1)) {
            m2 = m1;
            m1 = b[j];
          } else if (beats<true>(b[j], m2)) {
            m2 = b[j];
          }
        } else {  // values only (no indices), so equal values need no care
          m2 = std::max(m2, std::min(m1, b[j]));
          m1 = std::max(m1, b[j]);
        }
      }
      s.group[g] = p.bias != nullptr ? m1 + m2 : m1;
    }
    TopK<kNaN> groups{s.top_val.data(), s.top_idx.data(), p.topk_group};
    for (int64_t g = 0; g < p.n_group; ++g) groups.offer(s.group[g], static_cast<int32_t>(g));
    std::fill(s.kept.begin(), s.kept.end(), 0);
    for (int64_t i = 0; i < p.topk_group; ++i) s.kept[s.top_idx[i]] = 1;
  }
  // 4. The topk best biased experts, best first. With non-finite scores the masked experts are
  // offered as -inf rather than skipped, so that -inf or NaN among the kept ones rank as in the
  // reference; otherwise the kept groups alone hold at least topk experts that beat -inf.
  TopK<kNaN> experts{s.top_val.data(), ids, p.topk};
  for (int64_t g = 0; g < p.n_group; ++g) {
    if (!kNaN && !s.kept[g]) continue;
    const bool in = s.kept[g];
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j)
      experts.offer(in ? biased[j] : -kInf, static_cast<int32_t>(j));
  }
}

template <typename T>
void route_token(const T* logits, const Params& p, Scratch& s, float* weights, int32_t* ids) {
  const int64_t e = p.e;
  float* scores = s.scores.data();
  // 1. Scores in fp32: sigmoid as 1 / (1 + exp(-x)); softmax with the row max subtracted.
  if (p.softmax) {
    float m = -kInf;
    for (int64_t j = 0; j < e; ++j) {
      scores[j] = static_cast<float>(logits[j]);
      m = std::max(m, scores[j]);
    }
    // The sum in double: a running fp32 sum over a few hundred experts drifts by several ulp,
    // more than the 1e-6 the weights are held to against torch's (vectorized, pairwise) sum.
    double sum = 0.0;
    for (int64_t j = 0; j < e; ++j) {
      scores[j] = std::exp(scores[j] - m);
      sum += scores[j];
    }
    // A division per element by the fp32 sum; equal logits give equal scores.
    const float sum_f = static_cast<float>(sum);
    for (int64_t j = 0; j < e; ++j) scores[j] = scores[j] / sum_f;
  } else {
    for (int64_t j = 0; j < e; ++j) scores[j] = 1.0f / (1.0f + std::exp(-static_cast<float>(logits[j])));
  }
  // 2. Biased scores steer the choice only. A row of finite biased scores (all of them, short of
  // inf/NaN logits or bias) takes the fast path of the choice.
  const float* biased = scores;
  if (p.bias != nullptr) {
    for (int64_t j = 0; j < e; ++j) s.biased[j] = scores[j] + p.bias[j];
    biased = s.biased.data();
  }
  bool finite = true;
  for (int64_t j = 0; j < e; ++j) finite &= std::fabs(biased[j]) <= std::numeric_limits<float>::max();
  if (finite) choose<false>(biased, p, s, ids);
  else choose<true>(biased, p, s, ids);
  // 5. Weights: the unbiased scores, renormalized (+1e-20 as the reference) and scaled.
  // The sum in double for the same reason as softmax's (topk may be a few dozen).
  double sum = 0.0;
  for (int64_t i = 0; i < p.topk; ++i) {
    weights[i] = scores[ids[i]];
    sum += weights[i];
  }
  const float denom = static_cast<float>(sum) + 1e-20f;
  for (int64_t i = 0; i < p.topk; ++i) {
    const float w = p.renormalize ? weights[i] / denom : weights[i];
    weights[i] = w * p.scale;
  }
}

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& router_logits,
                                                 const std::optional<at::Tensor>& e_score_correction_bias,
                                                 int64_t n_group, int64_t topk_group, int64_t topk,
                                                 double routed_scaling_factor, c10::string_view score_func,
                                                 bool renormalize) {
  const std::string func(score_func);
  check_moe_route(router_logits, e_score_correction_bias, n_group, topk_group, topk, func);
  const int64_t t = router_logits.size(0);
  const int64_t e = router_logits.size(1);
  at::Tensor weights = at::empty({t, topk}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({t, topk}, router_logits.options().dtype(at::kInt));
  if (t == 0) return {weights, ids};
  const Params p{e,
                 n_group,
                 topk_group,
                 topk,
                 static_cast<float>(routed_scaling_factor),
                 func == "softmax",
                 renormalize,
                 e_score_correction_bias ? e_score_correction_bias->const_data_ptr<float>() : nullptr};
  float* pw = weights.data_ptr<float>();
  int32_t* pi = ids.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, router_logits.scalar_type(), "moe_route_cpu", [&] {
    const scalar_t* x = router_logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, t, std::max<int64_t>(1, kGrainElems / e), [&](int64_t begin, int64_t end) {
      Scratch s(p);
      for (int64_t i = begin; i < end; ++i) route_token(x + i * e, p, s, pw + i * topk, pi + i * topk);
    });
  });
  return {weights, ids};
}

}  // namespace
}  // namespace dsv3::moe::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) {
  using namespace dsv3::moe::cpu;
  m.impl("moe_route", &moe_route_cpu);
}
