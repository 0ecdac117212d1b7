// CPU kernels of the MLA ops (schemas in registration.cpp, semantics in
// dsv3_kernels/reference/mla.py).
//
// mla_decode: work items are (request, group of up to 16 query rows, split of the request's keys).
// Each item streams its keys once for all its rows (the loops of mla_cpu_avx512.h, mla_cpu_avx2.h
// or the portable one here, picked by cpu_isa(); their work is proportional to the rows) and
// leaves an unnormalized output with its running max and sum; with one split that is finalized in
// place, with several the splits are merged by their log-sum-exp. The levels' results differ only
// by summation order and the vector paths' exp (~1 ulp, 0 below kExpCutoff).
// Metadata is checked per request before anything is read: a request that would read out of
// bounds gets NaN instead. A row that sees a non-finite score leaves its attend kernel with m = NaN
// and gets out = lse = NaN (reference/mla.py); keys a row does not see never reach it (the
// portable loop skips them, the vector loops sanitize their values where needed).
//
// The FP8 cache (uint8, 656-byte tokens) takes the same kernels, its keys dequantized per tile.
// mla_cache_write is in mla_cache_write_cpu.cpp.
//
// DSV3_KERNELS_CPU_ISA picks the level (common/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/torch_glue.h"
#include "mla/mla_checks.h"
#include "mla/mla_cpu_avx2.h"
#include "mla/mla_cpu_avx512.h"

namespace dsv3::mla::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Keys per split that make a split worth its share of the combine and of waking a thread. With
// the work proportional to the rows, a request of the shipped model's 4 heads gains from two
// splits from 256 keys on (2 threads, s_q = 1 / 2, 256 keys: 38 / 65 us in one split, 29 / 49
// in two; 512 keys: 68 / 122 us, 46 / 78).
constexpr int64_t kMinSplitKeys = 128;

// ---------------------------------------------------------------- mla_decode

// q[0..576) . key[0..576) in 8 partial sums (each over 72 products, as a vector lane of the avx2
// path would be), for the compiler to vectorize without reassociating.
inline float dot_portable(const float* q, const float* key) {
  float part[8] = {};
  for (int d = 0; d < kDim; d += 8)
    for (int i = 0; i < 8; ++i) part[i] += q[d + i] * key[d + i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// The portable version of attend_avx2 (same contract, g.q row-major fp32), one key at a time: a
// row skips the keys it does not see. key: kDim floats of scratch.
template <typename T, bool Fp8>
void attend_portable(const RowGroup& g, const KeyRange& k, float* o, float* m, float* l, float* key, const float*) {
  std::fill(o, o + g.rows * kValueDim, 0.0f);
  std::fill(m, m + kGroupRows, -kInf);
  std::fill(l, l + kGroupRows, 0.0f);
  bool bad[kGroupRows] = {};
  const float* q = static_cast<const float*>(g.q);
  for (int64_t j = k.begin; j < k.end; ++j) {
    if constexpr (Fp8) {
      dequant_fp8_row(static_cast<const uint8_t*>(key_ptr<float_type_of<T>(), true>(k, j)), key);
    } else {
      const T* src = static_cast<const T*>(key_ptr<float_type_of<T>()>(k, j));
      for (int d = 0; d < kDim; ++d) key[d] = static_cast<float>(src[d]);
    }
    for (int r = 0; r < g.rows; ++r) {
      if (j > g.last[r]) continue;
      const float x = dot_portable(q + r * kDim, key) * g.scale;
      bad[r] |= nonfinite(x);
      float* orow = o + r * kValueDim;
      if (x > m[r]) {
        const float alpha = std::exp(m[r] - x);  // 0 for the first key (m = -inf)
        l[r] *= alpha;
        for (int c = 0; c < kValueDim; ++c) orow[c] *= alpha;
        m[r] = x;
      }
      const float p = std::exp(x - m[r]);
      l[r] += p;
      for (int c = 0; c < kValueDim; ++c) orow[c] += p * key[c];
    }
  }
  for (int r = 0; r < g.rows; ++r)
    if (bad[r]) m[r] = kNaN;
}

// A kernel and the layout of the queries it takes (RowGroup::q), into a buffer of
// kDim * kGroupRows floats: row-major, fp32 or (for the avx512_bf16 kernel) bf16.
template <typename T>
struct Attend {
  void (*layout)(const T* q, int rows, void* dst);
  void (*attend)(const RowGroup&, const KeyRange&, float*, float*, float*, float*, const float*);
};

template <typename T>
void layout_rows_f32(const T* q, int rows, void* dst) {
  for (int i = 0; i < rows * kDim; ++i) static_cast<float*>(dst)[i] = static_cast<float>(q[i]);
}

void layout_rows_bf16(const c10::BFloat16* q, int rows, void* dst) {
  std::memcpy(dst, q, rows * kDim * sizeof(c10::BFloat16));
}

template <typename T, bool Fp8>
Attend<T> pick_attend() {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu_isa_at_least(CpuIsa::kAvx512Bf16))
      return {&layout_rows_bf16, &attend_avx512<FloatType::kBFloat16, true, Fp8>};
  }
  if (cpu_isa_at_least(CpuIsa::kAvx512))
    return {&layout_rows_f32<T>, &attend_avx512<float_type_of<T>(), false, Fp8>};
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return {&layout_rows_f32<T>, &attend_avx2<float_type_of<T>(), Fp8>};
#endif
  return {&layout_rows_f32<T>, &attend_portable<T, Fp8>};
}

// A thread's buffers for the attend kernels, kept across calls (allocating and clearing them took
// ~3 us a call), each 64-byte aligned: a vector load that straddles two cache lines costs two
// (avx2 scores of 4 rows: 0.20 ns per FMA aligned, 0.25 at malloc's 16-byte alignment).
struct Scratch {
  static constexpr int64_t kFloats = kDim * kGroupRows + 2 * kTile * kDim + kDim + kGroupRows * kValueDim;
  std::vector<float> buf = std::vector<float>(kFloats + 16);
  float* qt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
  float* tile = qt + kDim * kGroupRows;  // 2 * kTile keys
  float* zero_key = tile + 2 * kTile * kDim;  // kDim zeros, never written
  float* o = zero_key + kDim;  // kGroupRows rows of 512

  static Scratch& of_this_thread() {
    thread_local Scratch scratch;
    return scratch;
  }
};

// out = o / l, lse = m + log(l); a row that saw no key gets 0 and -inf, one that saw a non-finite
// score (m = NaN) NaN and NaN.
template <typename T>
void finalize_row(const float* o, float m, float l, T* out, float* lse) {
  if (std::isnan(m)) {
    std::fill(out, out + kValueDim, static_cast<T>(kNaN));
    *lse = kNaN;
    return;
  }
  if (m == -kInf) {
    std::fill(out, out + kValueDim, static_cast<T>(0.0f));
    *lse = -kInf;
    return;
  }
  const float inv = 1.0f / l;
  for (int c = 0; c < kValueDim; ++c) out[c] = static_cast<T>(o[c] * inv);
  *lse = m + std::log(l);
}

// Split count for num_splits = 0: enough items for every thread twice over (evens out unequal
// lengths), but no split shorter than kMinSplitKeys; one thread has nothing to even out.
int64_t auto_splits(int64_t items, int64_t max_len) {
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || items >= 2 * threads) return 1;
  const int64_t want = (2 * threads + items - 1) / items;
  return std::max<int64_t>(1, std::min(want, max_len / kMinSplitKeys));
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q, const at::Tensor& kv_cache,
                                                  const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                                  double softmax_scale, bool causal, int64_t num_splits) {
  check_mla_decode(q, kv_cache, block_table, cache_seqlens, num_splits);
  const int64_t b = q.size(0), s_q = q.size(1), h = q.size(2), rows = s_q * h;
  auto out = at::empty({b, s_q, h, kLoraRank}, q.options());
  auto lse = at::empty({b, h, s_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const int64_t num_blocks = kv_cache.size(0), block_size = kv_cache.size(1), max_blocks = block_table.size(1);
  const int log2_block = __builtin_ctzll(static_cast<unsigned long long>(block_size));
  const int32_t* table = block_table.const_data_ptr<int32_t>();
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  std::vector<char> valid(b);
  int64_t max_len = 0;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t n = lens[i];
    bool ok = n >= 0 && n <= max_blocks * block_size;
    for (int64_t blk = 0; ok && blk < (n + block_size - 1) / block_size; ++blk) {
      const int32_t id = table[i * max_blocks + blk];
      ok = id >= 0 && id < num_blocks;
    }
    valid[i] = ok;
    if (ok) max_len = std::max(max_len, n);
  }

  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows;
  // Past one tile per split the extra splits would all be empty: they are not made.
  const int64_t splits = std::min(num_splits > 0 ? num_splits : auto_splits(b * groups, max_len),
                                  std::max<int64_t>(1, (max_len + kTile - 1) / kTile));
  const int64_t items = b * groups * splits;
  // Per item and row: o (512), m, l.
  constexpr int64_t kPartStride = kValueDim + 2;
  std::vector<float> part(splits > 1 ? items * kGroupRows * kPartStride : 0);
  float* lse_ptr = lse.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_decode_cpu", [&] {
    const scalar_t* pq = q.const_data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const Attend<scalar_t> kernel =
        is_fp8_cache(kv_cache) ? pick_attend<scalar_t, true>() : pick_attend<scalar_t, false>();
    const float scale = static_cast<float>(softmax_scale);

    // Row r = s * H + hd of request i: out row i * rows + r, lse at (i * H + hd) * s_q + s.
    auto lse_at = [&](int64_t i, int64_t r) { return lse_ptr + (i * h + r % h) * s_q + r / h; };

    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      Scratch& scratch = Scratch::of_this_thread();
      float *qt = scratch.qt, *tile = scratch.tile, *zero_key = scratch.zero_key, *o = scratch.o;
      alignas(64) int32_t last[kGroupRows];
      alignas(64) float m[kGroupRows], l[kGroupRows];
      int64_t loaded = -1;  // the (request, group) whose queries are in qt
      for (int64_t it = begin; it < end; ++it) {
        const int64_t i = it / (groups * splits), grp = (it / splits) % groups, sp = it % splits;
        if (!valid[i]) continue;
        const int64_t r0 = grp * kGroupRows;
        const int n_rows = static_cast<int>(std::min<int64_t>(kGroupRows, rows - r0));
        const int64_t n = lens[i];
        if (loaded != it / splits) {
          kernel.layout(pq + (i * rows + r0) * kDim, n_rows, qt);
          loaded = it / splits;
        }
        int64_t group_end = 0;  // one past the last key any row of the group sees
        for (int r = 0; r < kGroupRows; ++r) {
          last[r] = r < n_rows ? static_cast<int32_t>(causal ? n - s_q + (r0 + r) / h : n - 1) : -1;
          group_end = std::max<int64_t>(group_end, last[r] + 1);
        }
        // Splits own contiguous, tile-aligned shares of the request's keys; the last ones may be empty.
        const int64_t share = ((n + splits - 1) / splits + kTile - 1) / kTile * kTile;
        const KeyRange keys{kv_cache.const_data_ptr(), table + i * max_blocks, log2_block,
                            std::min(n, sp * share), std::min({n, (sp + 1) * share, group_end})};
        const RowGroup group{qt, last, n_rows, scale};
        kernel.attend(group, keys, o, m, l, tile, zero_key);
        for (int r = 0; r < n_rows; ++r) {
          if (splits == 1) {
            finalize_row(o + r * kValueDim, m[r], l[r], po + (i * rows + r0 + r) * kValueDim,
                         lse_at(i, r0 + r));
          } else {
            float* dst = part.data() + (it * kGroupRows + r) * kPartStride;
            std::copy(o + r * kValueDim, o + (r + 1) * kValueDim, dst);
            dst[kValueDim] = m[r];
            dst[kValueDim + 1] = l[r];
          }
        }
      }
    });

    if (splits > 1) {
      at::parallel_for(0, b * rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(kValueDim);
        for (int64_t x = begin; x < end; ++x) {
          const int64_t i = x / rows, r = x % rows;
          if (!valid[i]) continue;
          const int64_t split_stride = kGroupRows * kPartStride;
          const float* first = part.data() + (i * groups + r / kGroupRows) * splits * split_stride +
                               (r % kGroupRows) * kPartStride;
          float m_all = -kInf;
          bool nan = false;  // a split's rows that saw a non-finite score
          for (int64_t sp = 0; sp < splits; ++sp) {
            const float m_sp = first[sp * split_stride + kValueDim];
            nan |= std::isnan(m_sp);
            m_all = std::max(m_all, m_sp);
          }
          if (nan) m_all = kNaN;
          std::fill(acc.begin(), acc.end(), 0.0f);
          float l_all = 0.0f;
          for (int64_t sp = 0; sp < splits && m_all != -kInf && !nan; ++sp) {
            const float* src = first + sp * split_stride;
            if (src[kValueDim] == -kInf) continue;  // no key of this split seen: weight 0
            const float w = std::exp(src[kValueDim] - m_all);
            l_all += src[kValueDim + 1] * w;
            for (int c = 0; c < kValueDim; ++c) acc[c] += src[c] * w;
          }
          finalize_row(acc.data(), m_all, l_all, po + x * kValueDim, lse_at(i, r));
        }
      });
    }

    for (int64_t i = 0; i < b; ++i) {
      if (valid[i]) continue;
      std::fill(po + i * rows * kValueDim, po + (i + 1) * rows * kValueDim, static_cast<scalar_t>(kNaN));
      for (int64_t r = 0; r < rows; ++r) *lse_at(i, r) = kNaN;
    }
  });
  return {out, lse};
}

}  // namespace
}  // namespace dsv3::mla::cpu

TORCH_LIBRARY_IMPL(dsv3_kernels, CPU, m) { m.impl("mla_decode", &dsv3::mla::cpu::mla_decode_cpu); }
