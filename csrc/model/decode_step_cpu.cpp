// One decode step of a DeepSeek-V3-architecture model on the CPU in a single C++ call
// (torch.classes.dsv3_model.DecodeStep; dsv3/cpu_decode.py builds it from a dsv3.Transformer).
//
// Why: on a small model a decode step is bound by the calls, not the kernels. The Python forward
// (dsv3/model.py) spends ~8 us of argument checks and backend choice per dsv3_kernels op and
// ~1-5 us per small ATen op, ~240 of them per step of the shipped model, against ~0.4 ms of
// kernel work. Here the same dsv3_kernels CPU kernels run in the same order on the same
// arguments, called through the dispatcher (~0.3 us each), with the glue between them (splits,
// per-head layouts, RoPE of q_pe) written as loops instead of ATen ops.
//
// It computes what Transformer.forward computes for a decode Batch (s_q new tokens per request,
// no query_rows): every kernel output is the Python path's bit for bit, except RoPE of q_pe,
// whose fp32 products are rounded as written here (the Python path multiplies complex numbers;
// an fp32 ulp can move a bf16 rounding). tests/model/test_cpu_decode.py compares the two.
// The model checks (dtype, devices, shapes) happen once, in dsv3/cpu_decode.py; the kernels check
// their own arguments as always.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/float_type.h"

namespace dsv3::model {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kLatent = 512, kRope = 64, kHeadDim = kLatent + kRope;
constexpr int64_t kGemmBlock = 128;
// Up to this many rows the bf16 linears run grouped_gemm as one group, beyond it at::linear
// (dsv3/layers.py DECODE_ROWS: the same rule, so both paths run the same kernel).
constexpr int64_t kDecodeRows = 16;

// The dsv3_kernels ops, looked up once in the dispatcher (the CPU kernels run: every tensor here
// is a CPU tensor).
template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using RmsNorm = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, const OptTensor&);
using ActQuant = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, bool);
using Fp8Gemm = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::ScalarType);
using GroupedGemm = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&);
using CacheWrite = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double,
                        const OptTensor&, const OptTensor&);
using MlaDecode = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool,
                                             int64_t);
using SiluMul = std::tuple<Tensor, Tensor>(const Tensor&, bool);
using MoeRoute = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, int64_t, int64_t, int64_t, double,
                                            c10::string_view, bool);
using FusedMoe = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                        const OptTensor&);

struct Kernels {
  c10::TypedOperatorHandle<RmsNorm> rms_norm = kernel<RmsNorm>("dsv3_kernels::rms_norm");
  c10::TypedOperatorHandle<ActQuant> act_quant = kernel<ActQuant>("dsv3_kernels::act_quant");
  c10::TypedOperatorHandle<Fp8Gemm> fp8_gemm = kernel<Fp8Gemm>("dsv3_kernels::fp8_gemm");
  c10::TypedOperatorHandle<GroupedGemm> grouped_gemm = kernel<GroupedGemm>("dsv3_kernels::grouped_gemm");
  c10::TypedOperatorHandle<CacheWrite> mla_cache_write = kernel<CacheWrite>("dsv3_kernels::mla_cache_write");
  c10::TypedOperatorHandle<MlaDecode> mla_decode = kernel<MlaDecode>("dsv3_kernels::mla_decode");
  c10::TypedOperatorHandle<SiluMul> silu_mul = kernel<SiluMul>("dsv3_kernels::silu_mul");
  c10::TypedOperatorHandle<MoeRoute> moe_route = kernel<MoeRoute>("dsv3_kernels::moe_route");
  c10::TypedOperatorHandle<FusedMoe> fused_moe = kernel<FusedMoe>("dsv3_kernels::fused_moe");
};

// A linear's weight [out, in] (bf16, or e4m3 with its weight_scale_inv) as DecodeStep::linear runs it.
struct Linear {
  Tensor weight, scale;  // scale: empty for a bf16 weight
  Tensor grouped;        // bf16: weight as grouped_gemm's one group [1, out, in] (a view)
};

struct Norm {
  Tensor weight;
  double eps;
};

// The weights of one decoder layer (dsv3/cpu_decode.py lists them in this order).
struct Layer {
  Norm input_norm, q_a_norm, kv_a_norm, post_norm;
  Linear qkv_a, q_b, o_proj;
  Tensor w_uk_t, w_uv;  // MLA's absorbed kv_b_proj: [H, 512, nope] and [H, v, 512], bf16
  // the dense MLP, or a MoE layer's shared experts (gate_up.weight empty: none)
  Linear gate_up, down;
  // MoE only (gate_weight_t empty: a dense layer)
  Tensor gate_weight_t, gate_bias;  // fp32: mlp.gate.weight transposed [D, E] (a view), [E]
  Tensor w13, w13_scale, w2, w2_scale;  // scales empty for bf16 experts
};

// table[index] for a 2-D contiguous table and int64 index [N] (what F.embedding and Rope's
// indexing compute): a row copy each, where the ATen gather costs ~10 us per call.
Tensor rows_of(const Tensor& table, const Tensor& index, const char* what) {
  const int64_t n = index.size(0), rows = table.size(0), width = table.size(1), bytes = width * table.element_size();
  Tensor out = at::empty({n, width}, table.options());
  const int64_t* idx = index.data_ptr<int64_t>();
  const auto* src = static_cast<const char*>(table.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "DecodeStep: ", what, "[", i, "] = ", idx[i], " is out of range [0, ",
                rows, ")");
    std::memcpy(dst + i * bytes, src + idx[i] * bytes, bytes);
  }
  return out;
}

// Whether index (int64) is 0, 1, ..., n - 1 (a decode step's logits_index with s_q = 1).
bool all_rows(const Tensor& index, int64_t n) {
  if (index.numel() != n) return index.numel() == 0;
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] != i) return false;
  return true;
}

// rows [N, width] of a row-major [N, ld] bf16/fp32 matrix from column `col` on, contiguous.
Tensor columns(const Tensor& m, int64_t col, int64_t width) {
  const int64_t n = m.size(0), es = m.element_size(), ld = m.size(1) * es;
  Tensor out = at::empty({n, width}, m.options());
  const auto* src = static_cast<const char*>(m.data_ptr()) + col * es;
  auto* dst = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * width * es, src + i * ld, width * es);
  return out;
}

uint16_t bf16_bits(float f) {  // round to nearest even, as torch's float -> bfloat16
  return c10::BFloat16(f).x;
}

float bf16_float(uint16_t bits) { return bits_f32(static_cast<uint32_t>(bits) << 16); }

Linear make_linear(const Tensor& weight, const Tensor& scale) {
  return {weight, scale, scale.numel() > 0 ? Tensor() : weight.unsqueeze(0)};
}

// x bf16 [N, D] -> fp32, exactly (what .to(float32) computes, without its ATen call).
Tensor to_float(const Tensor& x) {
  Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const auto* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) dst[i] = bf16_float(src[i]);
  return out;
}

// Each row's argmax of fp32 [B, V] as torch.argmax gives it: the first maximum, and a NaN counts as
// the maximum (the first NaN).
std::vector<int64_t> argmax_rows(const Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* p = x.const_data_ptr<float>();
  std::vector<int64_t> out(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = p + r * cols;
    for (int64_t j = 1; j < cols && !std::isnan(row[out[r]]); ++j)
      if (std::isnan(row[j]) || row[j] > row[out[r]]) out[r] = j;
  }
  return out;
}

// The shapes DecodeStep's own loops rely on (the kernels check their arguments themselves).
void check_2d(const Tensor& t, const char* what, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous() && t.scalar_type() == dtype, "DecodeStep: ",
              what, " must be a contiguous 2-D ", dtype, " CPU tensor, got ", t.scalar_type(), " ", t.sizes());
}

void check_index(const Tensor& t, const char* what, bool may_be_empty = false) {
  if (may_be_empty && t.numel() == 0) return;
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() && t.scalar_type() == at::kLong, "DecodeStep: ",
              what, " must be a contiguous 1-D int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes());
}

inline OptTensor opt(const Tensor& t) { return t.numel() > 0 ? OptTensor(t) : std::nullopt; }

class DecodeStep : public torch::CustomClassHolder {
 public:
  // weights: embed_tokens, model.norm, lm_head, then per layer the 22 tensors of layer_weights()
  // in dsv3/cpu_decode.py; ints: [heads, qk_nope, qk_rope (64), v_head_dim, q_lora_rank, n_group,
  // topk_group, topk, renormalize]; floats: [softmax_scale, routed_scaling_factor, norm eps of
  // each layer's input/post norms and of model.norm, q_a_layernorm eps, kv_a_layernorm eps];
  // score_func: "sigmoid" or "softmax"; rope_cos / rope_sin: Rope's fp32 [max_positions, 32].
  DecodeStep(std::vector<Tensor> weights, Tensor rope_cos, Tensor rope_sin, std::vector<int64_t> ints,
             std::vector<double> floats, std::string score_func)
      : cos_(std::move(rope_cos)), sin_(std::move(rope_sin)), score_func_(std::move(score_func)) {
    TORCH_CHECK(ints.size() == 9 && floats.size() == 5, "DecodeStep: expected 9 ints and 5 floats");
    TORCH_CHECK(weights.size() >= 3 && (weights.size() - 3) % kPerLayer == 0,
                "DecodeStep: expected 3 + 22 per layer weights, got ", weights.size());
    heads_ = ints[0];
    nope_ = ints[1];
    TORCH_CHECK(ints[2] == kRope, "DecodeStep: qk_rope_head_dim must be ", kRope);
    v_dim_ = ints[3];
    q_lora_ = ints[4];
    n_group_ = ints[5];
    topk_group_ = ints[6];
    topk_ = ints[7];
    renormalize_ = ints[8] != 0;
    softmax_scale_ = floats[0];
    routed_scale_ = floats[1];
    const double eps = floats[2], q_eps = floats[3], kv_eps = floats[4];
    embed_ = weights[0];
    final_norm_ = {weights[1], eps};
    lm_head_ = make_linear(weights[2], at::empty({0}));
    for (size_t i = 3; i < weights.size(); i += kPerLayer) {
      const Tensor* w = &weights[i];
      Layer l;
      l.input_norm = {w[0], eps};
      l.qkv_a = make_linear(w[1], w[2]);
      l.q_a_norm = {w[3], q_eps};
      l.q_b = make_linear(w[4], w[5]);
      l.kv_a_norm = {w[6], kv_eps};
      l.w_uk_t = w[7];
      l.w_uv = w[8];
      l.o_proj = make_linear(w[9], w[10]);
      l.post_norm = {w[11], eps};
      l.gate_up = make_linear(w[12], w[13]);
      l.down = make_linear(w[14], w[15]);
      l.gate_weight_t = w[16].t();
      l.gate_bias = w[17];
      l.w13 = w[18];
      l.w13_scale = w[19];
      l.w2 = w[20];
      l.w2_scale = w[21];
      check_layer(l, layers_.size());
      layers_.push_back(std::move(l));
    }
    check_2d(embed_, "embed_tokens.weight", at::kBFloat16);
    check_2d(cos_, "rope_cos", at::kFloat);
    check_2d(sin_, "rope_sin", at::kFloat);
    TORCH_CHECK(cos_.size(1) == kRope / 2 && sin_.sizes() == cos_.sizes(), "DecodeStep: rope_cos and rope_sin must be [P, ",
                kRope / 2, "], got ", cos_.sizes(), " and ", sin_.sizes());
  }

  // input_ids int64 [N]; positions int64 [N]; kv [num_layers, ...] (LatentCache.kv: bf16 or the
  // FP8 cache); slot_mapping int64 [N]; block_table int32 [B, W]; cache_seqlens int32 [B]
  // (N = B * s_q); logits_index int64 [B'] or empty (all N rows)
  //   -> [logits fp32 [B' or N, vocab], final normed hidden [N, hidden] (Transformer.forward's
  //   hidden=True output)]
  std::vector<Tensor> forward(const Tensor& input_ids, const Tensor& positions, const Tensor& kv,
                              const Tensor& slot_mapping, const Tensor& block_table, const Tensor& cache_seqlens,
                              const Tensor& logits_index) {
    c10::InferenceMode guard;
    check_index(input_ids, "input_ids");
    check_index(positions, "positions");
    check_index(logits_index, "logits_index", true);
    const int64_t n = input_ids.size(0), b = cache_seqlens.dim() == 1 ? cache_seqlens.size(0) : 0;
    TORCH_CHECK(positions.size(0) == n, "DecodeStep: positions must have N = ", n, " entries, got ", positions.size(0));
    TORCH_CHECK(b > 0 && n % b == 0, "DecodeStep: N = ", n, " tokens is not s_q per request of ", b);
    TORCH_CHECK(kv.dim() == 4 && kv.size(0) >= static_cast<int64_t>(layers_.size()),
                "DecodeStep: kv must be [num_layers >= ", layers_.size(), ", num_blocks, block_size, width], got ",
                kv.sizes());
    Tensor x = rows_of(embed_, input_ids, "input_ids");
    // cos, sin fp32 [N, 32] of the positions: Rope's tables, gathered once for every layer
    Tensor cos = rows_of(cos_, positions, "positions"), sin = rows_of(sin_, positions, "positions");
    Tensor residual;
    const std::vector<Tensor>& caches = layer_caches(kv);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      Tensor h;
      if (i == 0) {
        h = std::get<0>(k_.rms_norm.call(x, l.input_norm.weight, l.input_norm.eps, std::nullopt));
        residual = x;
      } else {
        std::tie(h, residual) = k_.rms_norm.call(x, l.input_norm.weight, l.input_norm.eps, residual);
      }
      Tensor attn = attention(l, h, cos, sin, caches[i], slot_mapping, block_table, cache_seqlens, b);
      std::tie(h, residual) = k_.rms_norm.call(attn, l.post_norm.weight, l.post_norm.eps, residual);
      x = l.gate_weight_t.numel() > 0 ? moe(l, h) : mlp(l, h);
    }
    Tensor h = std::get<0>(k_.rms_norm.call(x, final_norm_.weight, final_norm_.eps, residual));
    Tensor rows = all_rows(logits_index, n) ? h : rows_of(h, logits_index, "logits_index");
    return {to_float(linear(lm_head_, rows)), h};
  }

  // A plain decode step from the host's numbers, as Generator's loop holds them: request i's newest
  // token input_ids[i] at position cached[i] (the tokens before it are cached), in the blocks
  // block_ids[sum(block_counts[:i]) ...][:block_counts[i]]. Builds the batch dsv3/cache.py
  // decode_batch builds (s_q = 1, every row's logits) and runs forward on it: the ~10 small tensor
  // calls of building it in Python cost ~0.1 ms a step next to a ~0.6 ms step of the shipped model.
  //   -> (logits fp32 [B, vocab], each row's argmax: the greedy tokens, as torch.argmax picks them)
  std::tuple<Tensor, std::vector<int64_t>> decode(const std::vector<int64_t>& input_ids,
                                                  const std::vector<int64_t>& cached,
                                                  const std::vector<int64_t>& block_ids,
                                                  const std::vector<int64_t>& block_counts, const Tensor& kv) {
    const int64_t b = static_cast<int64_t>(input_ids.size());
    TORCH_CHECK(b > 0 && cached.size() == input_ids.size() && block_counts.size() == input_ids.size(),
                "DecodeStep.decode: input_ids, cached and block_counts must have one entry per request, got ", b, ", ",
                cached.size(), " and ", block_counts.size());
    TORCH_CHECK(kv.dim() == 4, "DecodeStep.decode: kv must be [num_layers, num_blocks, block_size, width], got ",
                kv.sizes());
    const int64_t block_size = kv.size(2);
    int64_t width = 0, total = 0;
    for (int64_t i = 0; i < b; ++i) {
      TORCH_CHECK(block_counts[i] >= 0, "DecodeStep.decode: block_counts[", i, "] = ", block_counts[i], " < 0");
      TORCH_CHECK(cached[i] >= 0 && cached[i] / block_size < block_counts[i], "DecodeStep.decode: request ", i,
                  "'s new token at position ", cached[i], " needs block ", cached[i] / block_size, " of ",
                  block_size, " slots, and the request has ", block_counts[i], " blocks");
      width = std::max(width, block_counts[i]);
      total += block_counts[i];
    }
    TORCH_CHECK(total == static_cast<int64_t>(block_ids.size()), "DecodeStep.decode: block_counts add up to ", total,
                " blocks, block_ids has ", block_ids.size());
    const auto i64 = at::TensorOptions().dtype(at::kLong), i32 = at::TensorOptions().dtype(at::kInt);
    Tensor ids = at::tensor(input_ids, i64), pos = at::tensor(cached, i64), slots = at::empty({b}, i64);
    Tensor table = at::zeros({b, width}, i32), seqlens = at::empty({b}, i32);
    int64_t* pslot = slots.data_ptr<int64_t>();
    int32_t* ptab = table.data_ptr<int32_t>();
    int32_t* plen = seqlens.data_ptr<int32_t>();
    for (int64_t i = 0, first = 0; i < b; first += block_counts[i], ++i) {
      const int64_t* blocks = block_ids.data() + first;
      pslot[i] = blocks[cached[i] / block_size] * block_size + cached[i] % block_size;
      for (int64_t j = 0; j < block_counts[i]; ++j) ptab[i * width + j] = static_cast<int32_t>(blocks[j]);
      plen[i] = static_cast<int32_t>(cached[i] + 1);
    }
    Tensor logits = forward(ids, pos, kv, slots, table, seqlens, at::empty({0}, i64))[0];
    return {logits, argmax_rows(logits)};
  }

 private:
  static constexpr size_t kPerLayer = 22;

  // MLA (dsv3/attention.py MLA.forward for a decode batch): the projections, the cache write,
  // q_nope absorbed through W_UK, mla_decode, W_UV and o_proj.
  Tensor attention(const Layer& l, const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& cache,
                   const Tensor& slot_mapping, const Tensor& block_table, const Tensor& cache_seqlens,
                   int64_t b) const {
    const int64_t n = x.size(0), h = heads_, qk = nope_ + kRope;
    Tensor qkv = linear(l.qkv_a, x);  // [N, q_lora | 512 | 64]
    Tensor q = linear(l.q_b, std::get<0>(k_.rms_norm.call(columns(qkv, 0, q_lora_), l.q_a_norm.weight, l.q_a_norm.eps,
                                                       std::nullopt)));  // [N, H * qk]
    Tensor c_kv = columns(qkv, q_lora_, kLatent), k_pe = columns(qkv, q_lora_ + kLatent, kRope);
    k_.mla_cache_write.call(c_kv, k_pe, cache, slot_mapping, l.kv_a_norm.weight, l.kv_a_norm.eps, cos, sin);

    // q_nope per head, head-major [H * N, nope] (one grouped_gemm group per head), and the
    // RoPE'd q_pe straight into the query [N, H, 576]'s last 64.
    Tensor q_nope = at::empty({h * n, nope_}, x.options());
    Tensor query = at::empty({n, h, kHeadDim}, x.options());
    const auto* qs = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    auto* qn = reinterpret_cast<uint16_t*>(q_nope.data_ptr<at::BFloat16>());
    auto* qq = reinterpret_cast<uint16_t*>(query.data_ptr<at::BFloat16>());
    const float* cs = cos.data_ptr<float>();
    const float* sn = sin.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < h; ++j) {
        const uint16_t* src = qs + (t * h + j) * qk;
        std::memcpy(qn + (j * n + t) * nope_, src, nope_ * 2);
        uint16_t* pe = qq + (t * h + j) * kHeadDim + kLatent;
        for (int64_t p = 0; p < kRope / 2; ++p) {  // interleaved pairs, fp32 (dsv3/rope.py apply_rope)
          const float x0 = bf16_float(src[nope_ + 2 * p]), x1 = bf16_float(src[nope_ + 2 * p + 1]);
          const float c = cs[t * (kRope / 2) + p], s = sn[t * (kRope / 2) + p];
          pe[2 * p] = bf16_bits(x0 * c - x1 * s);
          pe[2 * p + 1] = bf16_bits(x0 * s + x1 * c);
        }
      }
    }
    Tensor offsets = segments(h, n);
    Tensor q_lat = k_.grouped_gemm.call(q_nope, l.w_uk_t, offsets, std::nullopt, std::nullopt);  // [H * N, 512]
    const auto* ql = reinterpret_cast<const uint16_t*>(q_lat.data_ptr<at::BFloat16>());
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < h; ++j)
        std::memcpy(qq + (t * h + j) * kHeadDim, ql + (j * n + t) * kLatent, kLatent * 2);

    Tensor out = std::get<0>(k_.mla_decode.call(query.view({b, n / b, h, kHeadDim}), cache, block_table,
                                                cache_seqlens, softmax_scale_, true, 0));  // [B, s_q, H, 512]
    Tensor lat = out.view({n, h, kLatent});
    if (n > 1) lat = lat.transpose(0, 1).contiguous();  // head-major [H, N, 512]
    Tensor v = k_.grouped_gemm.call(lat.view({h * n, kLatent}), l.w_uv, offsets, std::nullopt,
                                    std::nullopt);  // [H * N, v]
    if (n > 1) v = v.view({h, n, v_dim_}).transpose(0, 1).contiguous();
    return linear(l.o_proj, v.view({n, h * v_dim_}));
  }

  Tensor mlp(const Layer& l, const Tensor& x) const {  // layers.MLP: gate_up, silu_mul, down
    Tensor act = std::get<0>(k_.silu_mul.call(linear(l.gate_up, x), false));
    return linear(l.down, act);
  }

  Tensor moe(const Layer& l, const Tensor& x) const {  // moe.MoE with one rank: gate, experts, shared
    Tensor logits = at::mm(to_float(x), l.gate_weight_t);  // what F.linear runs (at::mm with weight.t())
    auto [weights, ids] = k_.moe_route.call(logits, l.gate_bias, n_group_, topk_group_, topk_, routed_scale_,
                                            score_func_, renormalize_);
    Tensor out = k_.fused_moe.call(x, l.w13, l.w2, weights, ids, opt(l.w13_scale), opt(l.w2_scale));
    if (l.gate_up.weight.numel() > 0) out = out + mlp(l, x);
    return out;
  }

  void check_layer(const Layer& l, size_t i) const {
    const int64_t qk = nope_ + kRope;
    TORCH_CHECK(l.qkv_a.weight.dim() == 2 && l.qkv_a.weight.size(0) == q_lora_ + kHeadDim, "DecodeStep: layer ", i,
                ": q_a + kv_a weight must have q_lora_rank + ", kHeadDim, " rows, got ", l.qkv_a.weight.sizes());
    TORCH_CHECK(l.q_b.weight.dim() == 2 && l.q_b.weight.size(0) == heads_ * qk, "DecodeStep: layer ", i,
                ": q_b_proj weight must have heads * ", qk, " rows, got ", l.q_b.weight.sizes());
    TORCH_CHECK(l.w_uk_t.sizes() == at::IntArrayRef({heads_, kLatent, nope_}) && l.w_uk_t.is_contiguous() &&
                    l.w_uv.sizes() == at::IntArrayRef({heads_, v_dim_, kLatent}) && l.w_uv.is_contiguous(),
                "DecodeStep: layer ", i, ": absorbed weights must be [H, ", kLatent, ", nope] and [H, v, ", kLatent,
                "], got ", l.w_uk_t.sizes(), " and ", l.w_uv.sizes());
  }

  // kv[i] for every layer, kept while kv is the same cache (a select costs ~3 us per layer and step).
  const std::vector<Tensor>& layer_caches(const Tensor& kv) {
    if (!cache_layers_.empty() && cache_layers_[0].data_ptr() == kv.data_ptr() &&
        cache_layers_[0].sizes() == kv.sizes().slice(1) && cache_layers_[0].dtype() == kv.dtype())
      return cache_layers_;
    cache_layers_.clear();
    for (size_t i = 0; i < layers_.size(); ++i) cache_layers_.push_back(kv[i]);
    return cache_layers_;
  }

  // A linear as dsv3/layers.py linear() runs it: FP8 (a scale given) by act_quant + fp8_gemm,
  // bf16 up to kDecodeRows rows by grouped_gemm with one group, else at::linear.
  Tensor linear(const Linear& l, const Tensor& x) const {
    if (l.scale.numel() > 0) {
      auto [a, a_scale] = k_.act_quant.call(x, kGemmBlock, false);
      return k_.fp8_gemm.call(a, a_scale, l.weight, l.scale, x.scalar_type());
    }
    if (x.size(0) <= kDecodeRows)
      return k_.grouped_gemm.call(x, l.grouped, segments(1, x.size(0)), std::nullopt, std::nullopt);
    return at::linear(x, l.weight);
  }

  // grouped_gemm offsets int32 [groups + 1] of `groups` segments of `rows` rows (cached: a few
  // shapes per model).
  const Tensor& segments(int64_t groups, int64_t rows) const {
    const auto key = std::make_pair(groups, rows);
    auto it = segments_.find(key);
    if (it == segments_.end())
      it = segments_.emplace(key, at::arange(0, (groups + 1) * rows, rows, at::TensorOptions().dtype(at::kInt))).first;
    return it->second;
  }

  Kernels k_;
  std::vector<Layer> layers_;
  Tensor cos_, sin_;
  Tensor embed_;
  Norm final_norm_;
  Linear lm_head_;
  int64_t heads_, nope_, v_dim_, q_lora_, n_group_, topk_group_, topk_;
  bool renormalize_;
  double softmax_scale_, routed_scale_;
  std::string score_func_;
  mutable std::map<std::pair<int64_t, int64_t>, Tensor> segments_;
  std::vector<Tensor> cache_layers_;
};

}  // namespace
}  // namespace dsv3::model

TORCH_LIBRARY(dsv3_model, m) {
  m.class_<dsv3::model::DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<at::Tensor>, at::Tensor, at::Tensor, std::vector<int64_t>, std::vector<double>,
                       std::string>())
      .def("forward", &dsv3::model::DecodeStep::forward)
      .def("decode", &dsv3::model::DecodeStep::decode);
}
