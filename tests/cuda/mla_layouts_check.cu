// Host-only check (no GPU) of the layout facts the sm_90a MLA decode kernel relies on, evaluated
// with CuTe itself on the CPU. Built and run by tests/test_sass.py (nvcc, host code only):
//   nvcc -std=c++17 --expt-relaxed-constexpr -I<cutlass>/include -Icsrc tests/cuda/mla_layouts_check.cu
// Prints "OK" and exits 0, or names the first failed check and exits 1.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <utility>

#include "mla/mla_decode_sm90_layouts.cuh"

using namespace cute;
using namespace dsv3::mla;

static int failures = 0;
#define CHECK(cond, ...)                                       \
  do {                                                         \
    if (!(cond)) {                                             \
      if (failures++ < 10) {                                   \
        std::printf("FAILED %s:%d %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                              \
        std::printf("\n");                                     \
      }                                                        \
    }                                                          \
  } while (0)

template <class Element>
void check() {
  using L = MlaLayouts<Element>;
  alignas(1024) static Element buf[64 * 576];
  alignas(1024) static Element pbuf[64 * 64];
  Tensor sK = make_tensor(make_smem_ptr(buf), typename L::SmemLayoutQK{});
  Tensor sVt = make_tensor(make_smem_ptr(buf), typename L::SmemLayoutVt{});
  Tensor sP = make_tensor(make_smem_ptr(pbuf), typename L::SmemLayoutP{});
  const Element* base = buf;

  // (1) V^T is the K tile transposed: sVt(n, k) is sK(k, n) for the 512 value dims.
  for (int n = 0; n < 512; ++n)
    for (int k = 0; k < 64; ++k) CHECK(&sVt(n, k) == &sK(k, n), "n=%d k=%d", n, k);
  // Every element of the K tile has its own address (a bijection onto the 64 x 576 buffer).
  {
    std::set<long> seen;
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 576; ++c) seen.insert(&sK(r, c) - base);
    CHECK(seen.size() == 64 * 576 && *seen.begin() == 0 && *seen.rbegin() == 64 * 576 - 1, "bijection");
  }
  // (2) the cp.async addressing: 16-byte chunks are contiguous, and moving 32 rows or one 64-column
  // block adds a constant to the swizzled address.
  for (int r = 0; r < 32; ++r)
    for (int c = 0; c < 64; c += 8)
      for (int h = 0; h < 2; ++h)
        for (int cb = 0; cb < 9; ++cb) {
          const Element* want = &sK(r, c) + h * 32 * 64 + cb * 64 * 64;
          for (int e = 0; e < 8; ++e)
            CHECK(&sK(r + 32 * h, cb * 64 + c + e) == want + e, "r=%d c=%d h=%d cb=%d e=%d", r, c, h, cb, e);
        }

  // (3) accumulator (row, col) maps from identity-tensor partitioning, for every thread.
  typename L::TiledMmaS mma_s;
  typename L::TiledMmaO mma_o;
  std::set<std::pair<int, int>> s_cov, o_cov;
  for (int t = 0; t < 256; ++t) {
    auto thr_s = mma_s.get_thread_slice(t);
    auto thr_o = mma_o.get_thread_slice(t);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, _64>{});
    Tensor tOrO = partition_fragment_C(mma_o, Shape<_64, _512>{});
    CHECK(size(tSrS) == 16 && size(tOrO) == 128, "fragment sizes %d %d", int(size(tSrS)), int(size(tOrO)));
    Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, _64>{}));
    Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<_64, _512>{}));
    Tensor tScS = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    Tensor tOcO = make_tensor(cO.data(), acc_rowcol(cO.layout()));
    const int wg = t / 128, warp = (t % 128) / 32, lane = t % 32;
    CHECK(size<0>(tScS) == 2 && size<1>(tScS) == 8 && size<0>(tOcO) == 2 && size<1>(tOcO) == 64, "rowcol shapes");
    for (int i = 0; i < 2; ++i) {
      const int row = get<0>(tScS(i, 0));
      CHECK(row == 16 * warp + lane / 4 + 8 * i, "t=%d i=%d row=%d", t, i, row);
      CHECK(get<0>(tOcO(i, 0)) == row, "t=%d i=%d O row %d != S row %d", t, i, int(get<0>(tOcO(i, 0))), row);
      for (int j = 0; j < 8; ++j) {
        const int r = get<0>(tScS(i, j)), c = get<1>(tScS(i, j));
        CHECK(r == row, "t=%d S row varies", t);
        CHECK(c >= 32 * wg && c < 32 * wg + 32, "t=%d S col %d outside WG half", t, c);
        CHECK(c % 8 / 2 == lane % 4, "t=%d S col %d not this quad lane's", t, c);
        CHECK(s_cov.insert({r, c}).second, "S (%d,%d) twice", r, c);
      }
      for (int j = 0; j < 64; ++j) {
        const int r = get<0>(tOcO(i, j)), c = get<1>(tOcO(i, j));
        CHECK(r == row, "t=%d O row varies", t);
        CHECK(c >= 256 * wg && c < 256 * wg + 256, "t=%d O col %d outside WG half", t, c);
        if (j % 2 == 1) CHECK(c == get<1>(tOcO(i, j - 1)) + 1, "t=%d O pair not adjacent", t);
        CHECK(o_cov.insert({r, c}).second, "O (%d,%d) twice", r, c);
      }
    }
    // The fragment's rowcol view and the coordinate rowcol view enumerate the flat fragment alike.
    {
      auto lf = acc_rowcol(tSrS.layout());
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 8; ++j) {
          // flat fragment index lf(i,j) holds element cS(lf(i,j)); the coord view says tScS(i,j)
          CHECK(cS(lf(i, j)) == tScS(i, j), "t=%d S fragment/coord views differ at (%d,%d)", t, i, j);
        }
      auto lo = acc_rowcol(tOrO.layout());
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 64; ++j) CHECK(cO(lo(i, j)) == tOcO(i, j), "t=%d O views differ at (%d,%d)", t, i, j);
    }
    // P goes to smem through partition_C(sP): element i lands at sP(coordinate of element i).
    Tensor tSsP = thr_s.partition_C(sP);
    for (int i = 0; i < 16; ++i) {
      CHECK(&tSsP(i) == &sP(get<0>(cS(i)), get<1>(cS(i))), "t=%d P element %d misplaced", t, i);
    }
    // The S B-operand of WG w is keys 32w..32w+31 of the tile.
    Tensor tSsK = thr_s.partition_B(sK);
    CHECK(&tSsK(0, 0, 0) == &sK(32 * wg, 0), "t=%d K half", t);
    Tensor tOsV = thr_o.partition_B(sVt);
    CHECK(&tOsV(0, 0, 0) == &sVt(256 * wg, 0), "t=%d V half", t);
  }
  CHECK(s_cov.size() == 64 * 64 && o_cov.size() == 64 * 512, "coverage %zu %zu", s_cov.size(), o_cov.size());
}

int main() {
  check<cutlass::bfloat16_t>();
  check<cutlass::half_t>();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
