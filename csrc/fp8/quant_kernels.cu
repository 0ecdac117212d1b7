// FP8 block quantisation kernels: act_quant, weight_quant, weight_dequant (see quant_kernels.cuh).
// Memory-bound: 16-byte vector loads where the row length and pointers allow it, a scalar
// fallback otherwise. Bit-exact with dsv3_kernels/reference/fp8.py (the rounding is in
// quant_math.cuh).
#include "fp8/quant_kernels.cuh"

#include "fp8/quant_math.cuh"

namespace dsv3::fp8 {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float fp8_to_float(uint8_t b) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3)));
}

// ---- act_quant ----
// Thread group = one (row, block): 2^log2_group threads, each owning one 16-byte vector of x,
// so the block's values stay in registers between the amax and the quantisation.
template <class T>
__global__ void act_quant_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                     int64_t rows, int64_t k, int64_t nb, int log2_group, int block_size,
                                     bool ue8m0) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = t >> log2_group;  // row * nb + block
  const int lane = static_cast<int>(t & ((1 << log2_group) - 1));
  const int64_t row = g / nb;
  const int64_t col = (g - row * nb) * block_size + lane * kVec;
  // k % kVec == 0, so a vector is wholly inside the (possibly partial) last block or wholly out.
  const bool active = row < rows && col < k;

  float v[kVec];
  if (active) {
    const Vec<T, kVec> in = *reinterpret_cast<const Vec<T, kVec>*>(x + row * k + col);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_float(in.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = 0.0f;
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = max_nan(amax, fabsf(v[i]));
  const float s = block_scale(group_max(amax, 1 << log2_group), ue8m0);
  if (!active) return;

  Vec<uint16_t, kVec / 2> out;
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) out.v[i] = quant2(v[2 * i], v[2 * i + 1], s);
  *reinterpret_cast<Vec<uint16_t, kVec / 2>*>(q + row * k + col) = out;
  if (lane == 0) scale[g] = s;
}

// Any block size and alignment: a group of min(32, block_size) threads strides through the
// block twice (amax, then quantise; the second read hits the cache).
template <class T>
__global__ void act_quant_scalar_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                        int64_t rows, int64_t k, int64_t nb, int log2_group, int block_size,
                                        bool ue8m0) {
  const int group = 1 << log2_group;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = t >> log2_group;
  const int lane = static_cast<int>(t & (group - 1));
  const int64_t row = g / nb;
  const int64_t begin = (g - row * nb) * block_size;
  const int64_t end = begin + block_size < k ? begin + block_size : k;
  const bool active = row < rows;
  const T* xr = x + row * k;

  float amax = 0.0f;
  if (active) {
    for (int64_t c = begin + lane; c < end; c += group) amax = max_nan(amax, fabsf(to_float(xr[c])));
  }
  const float s = block_scale(group_max(amax, group), ue8m0);
  if (!active) return;
  for (int64_t c = begin + lane; c < end; c += group) q[row * k + c] = quant1(to_float(xr[c]), s);
  if (lane == 0) scale[g] = s;
}

// ---- weight_quant ----
// One CTA per block_size x block_size block (edges partial): amax over the block, then quantise
// on a second pass (the block is at most 4 MB and mostly re-read from L2; weights are quantised
// once, offline). kVec = 16 / sizeof(T) needs k % kVec == 0 and an aligned w, else kVec = 1.
template <class T, int kVec>
__global__ void weight_quant_kernel(const T* __restrict__ w, uint8_t* __restrict__ q, float* __restrict__ scale_inv,
                                    int64_t n, int64_t k, int block_size, int64_t nbk) {
  const int64_t r0 = blockIdx.x / nbk * block_size;
  const int64_t c0 = blockIdx.x % nbk * block_size;
  const int64_t rows = n - r0 < block_size ? n - r0 : block_size;
  const int64_t cols = k - c0 < block_size ? k - c0 : block_size;  // a multiple of kVec
  const int64_t vec_per_row = cols / kVec;
  const int64_t count = rows * vec_per_row;
  const T* wb = w + r0 * k + c0;

  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const Vec<T, kVec> in = *reinterpret_cast<const Vec<T, kVec>*>(wb + i / vec_per_row * k + i % vec_per_row * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) amax = max_nan(amax, fabsf(to_float(in.v[j])));
  }
  __shared__ float warp_max[kThreads / 32];
  amax = group_max(amax, 32);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) amax = max_nan(amax, warp_max[i]);
  const float s = block_scale(amax, false);

  uint8_t* qb = q + r0 * k + c0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t off = i / vec_per_row * k + i % vec_per_row * kVec;
    const Vec<T, kVec> in = *reinterpret_cast<const Vec<T, kVec>*>(wb + off);
    if constexpr (kVec == 1) {
      qb[off] = quant1(to_float(in.v[0]), s);
    } else {
      Vec<uint16_t, kVec / 2> out;
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) out.v[j] = quant2(to_float(in.v[2 * j]), to_float(in.v[2 * j + 1]), s);
      *reinterpret_cast<Vec<uint16_t, kVec / 2>*>(qb + off) = out;
    }
  }
  if (threadIdx.x == 0) scale_inv[blockIdx.x] = s;
}

// ---- weight_dequant ----
// kVec fp8 values per thread (16 when k % 16 == 0 and pointers are aligned, else 1); a run of
// 16 aligned columns never crosses a scale block since block_size is a multiple of 16.
template <class TOut, int kVec>
__global__ void weight_dequant_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale_inv,
                                      TOut* __restrict__ out, int64_t n, int64_t k, int log2_bs, int64_t nbk) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vec_per_row = k / kVec;
  if (t >= n * vec_per_row) return;
  const int64_t row = t / vec_per_row;
  const int64_t col = (t - row * vec_per_row) * kVec;
  const float s = scale_inv[(row >> log2_bs) * nbk + (col >> log2_bs)];
  const Vec<uint8_t, kVec> in = *reinterpret_cast<const Vec<uint8_t, kVec>*>(q + row * k + col);
  Vec<TOut, kVec> res;
#pragma unroll
  for (int i = 0; i < kVec; ++i) res.v[i] = from_float<TOut>(fp8_to_float(in.v[i]) * s);
  if constexpr (sizeof(res) % 16 == 0) {
    // Copy as 16-byte words: a struct copy of bf16/half members may be split into narrow stores.
    const uint4* src = reinterpret_cast<const uint4*>(&res);
    uint4* dst = reinterpret_cast<uint4*>(out + row * k + col);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(res) / 16); ++i) dst[i] = src[i];
  } else {
    *reinterpret_cast<Vec<TOut, kVec>*>(out + row * k + col) = res;
  }
}

// ---- launch helpers ----
int log2_int(int v) {
  int l = 0;
  while ((1 << (l + 1)) <= v) ++l;
  return l;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned blocks_for(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <class T>
const char* act_quant_typed(const T* x, int64_t rows, int64_t k, int block_size, bool ue8m0, uint8_t* q,
                            float* scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t nb = (k + block_size - 1) / block_size;
  if (k % kVec == 0 && block_size / kVec <= 32 && aligned16(x)) {
    const int log2_group = log2_int(block_size / kVec);
    act_quant_vec_kernel<T><<<blocks_for((rows * nb) << log2_group), kThreads, 0, stream>>>(
        x, q, scale, rows, k, nb, log2_group, block_size, ue8m0);
  } else {
    const int log2_group = log2_int(block_size < 32 ? block_size : 32);
    act_quant_scalar_kernel<T><<<blocks_for((rows * nb) << log2_group), kThreads, 0, stream>>>(
        x, q, scale, rows, k, nb, log2_group, block_size, ue8m0);
  }
  return last_error();
}

template <class T>
const char* weight_quant_typed(const T* w, int64_t n, int64_t k, int block_size, uint8_t* q, float* scale_inv,
                               cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t nbn = (n + block_size - 1) / block_size, nbk = (k + block_size - 1) / block_size;
  const bool vec = k % kVec == 0 && aligned16(w);
  // Small blocks need fewer threads: one per vector, at least a warp.
  const int64_t vectors = static_cast<int64_t>(block_size) * block_size / (vec ? kVec : 1);
  const int threads = vectors >= kThreads ? kThreads : (vectors < 32 ? 32 : static_cast<int>(vectors));
  const unsigned grid = static_cast<unsigned>(nbn * nbk);
  if (vec) {
    weight_quant_kernel<T, kVec><<<grid, threads, 0, stream>>>(w, q, scale_inv, n, k, block_size, nbk);
  } else {
    weight_quant_kernel<T, 1><<<grid, threads, 0, stream>>>(w, q, scale_inv, n, k, block_size, nbk);
  }
  return last_error();
}

template <class TOut>
const char* weight_dequant_typed(const uint8_t* q, const float* scale_inv, int64_t n, int64_t k, int block_size,
                                 TOut* out, cudaStream_t stream) {
  const int64_t nbk = (k + block_size - 1) / block_size;
  const int log2_bs = log2_int(block_size);
  if (k % 16 == 0 && aligned16(q) && aligned16(out)) {
    weight_dequant_kernel<TOut, 16><<<blocks_for(n * (k / 16)), kThreads, 0, stream>>>(q, scale_inv, out, n, k,
                                                                                       log2_bs, nbk);
  } else {
    weight_dequant_kernel<TOut, 1><<<blocks_for(n * k), kThreads, 0, stream>>>(q, scale_inv, out, n, k, log2_bs,
                                                                              nbk);
  }
  return last_error();
}

}  // namespace

const char* act_quant_launch(const void* x, FloatType x_type, int64_t rows, int64_t k, int block_size, bool ue8m0,
                             void* q, float* scale, cudaStream_t stream) {
  if (rows == 0 || k == 0) return nullptr;
  auto* q8 = static_cast<uint8_t*>(q);
  switch (x_type) {
    case FloatType::kFloat32:
      return act_quant_typed(static_cast<const float*>(x), rows, k, block_size, ue8m0, q8, scale, stream);
    case FloatType::kBFloat16:
      return act_quant_typed(static_cast<const __nv_bfloat16*>(x), rows, k, block_size, ue8m0, q8, scale, stream);
    case FloatType::kFloat16:
      return act_quant_typed(static_cast<const __half*>(x), rows, k, block_size, ue8m0, q8, scale, stream);
  }
  return "act_quant: unsupported input type";
}

const char* weight_quant_launch(const void* w, FloatType w_type, int64_t n, int64_t k, int block_size, void* q,
                                float* scale_inv, cudaStream_t stream) {
  if (n == 0 || k == 0) return nullptr;
  auto* q8 = static_cast<uint8_t*>(q);
  switch (w_type) {
    case FloatType::kFloat32:
      return weight_quant_typed(static_cast<const float*>(w), n, k, block_size, q8, scale_inv, stream);
    case FloatType::kBFloat16:
      return weight_quant_typed(static_cast<const __nv_bfloat16*>(w), n, k, block_size, q8, scale_inv, stream);
    case FloatType::kFloat16:
      return weight_quant_typed(static_cast<const __half*>(w), n, k, block_size, q8, scale_inv, stream);
  }
  return "weight_quant: unsupported input type";
}

const char* weight_dequant_launch(const void* q, const float* scale_inv, int64_t n, int64_t k, int block_size,
                                  FloatType out_type, void* out, cudaStream_t stream) {
  if (n == 0 || k == 0) return nullptr;
  const auto* q8 = static_cast<const uint8_t*>(q);
  switch (out_type) {
    case FloatType::kFloat32:
      return weight_dequant_typed(q8, scale_inv, n, k, block_size, static_cast<float*>(out), stream);
    case FloatType::kBFloat16:
      return weight_dequant_typed(q8, scale_inv, n, k, block_size, static_cast<__nv_bfloat16*>(out), stream);
    case FloatType::kFloat16:
      return weight_dequant_typed(q8, scale_inv, n, k, block_size, static_cast<__half*>(out), stream);
  }
  return "weight_dequant: unsupported output type";
}

}  // namespace dsv3::fp8
