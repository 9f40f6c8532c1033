// Paged prefill attention for head dims 64 and 128 on the tensor cores with mma.sync
// (m16n8k16, 16-bit inputs, fp32 accumulation), flash-attention-2 style: scores, softmax
// state and the output stay in registers.
//
// A block serves one query tile of one head: kWarps warps of kMt m-tiles (16 query rows each).
// It gathers each 64-position K/V tile from the paged cache into a ring of kStages
// shared-memory stages by cp.async: the copies of the next tiles fly while the warps compute
// on the current one, and one barrier per tile both publishes a tile and frees the stage the
// next copy overwrites. A warp takes a tile in passes of kBn positions: S = Q K^T for its rows
// (K fragments by ldmatrix.x4, each feeding kMt mmas), the causal mask only in passes that
// cross its diagonal, the online softmax in the exp2 domain (scale and log2(e) folded into one
// multiply-add; the output is rescaled only when some row's maximum grew), then P V with the S
// accumulators reused as the A fragments of P (the m16n8k16 C and A layouts line up) and V
// fragments by transposing ldmatrix.x4. Passes after a warp's last row are skipped.
//
// kMt = 1 keeps the warp's Q fragments in registers; kMt = 2 reloads them from shared memory
// each pass, which leaves registers for 32 rows of output and lets every K and V fragment feed
// two mmas. That matters because shared-memory bandwidth (128 bytes per clock per SM) bounds
// this design: with 16 rows per warp every mma needs 256 bytes of fragments (plus the tile
// writes), more than the tensor cores' mma.sync rate allows; with 32 rows and 32-position
// passes it is 192.
//
// Blocks are numbered longest-first: block x serves head x % heads of sequence
// (x / heads) % seqs and the query tile `rank` = x / (heads seqs) counted from the end of that
// sequence, so the last tiles (the most K/V positions) start first and the short ones fill the
// tail; the heads of one tile, which share K/V rows through GQA, run side by side.
#include <cfloat>
#include <climits>

#include "kernels/cuda/attention_mma.cuh"

namespace pds::kernels::cuda {
namespace {

constexpr int kBk = 64;  // K/V positions per tile

// A tile configuration: kWarps warps of kMt m-tiles (16 rows each), S in passes of kBn
// positions, a ring of kStages K/V tiles, and the blocks per SM the registers must allow.
// Shared memory: the Q tile, then the ring stages (a K tile, then a V tile), rows padded by 8
// elements (16 bytes) so the 8 rows one ldmatrix phase reads hit distinct banks.
template <int Warps, int Mt, int Bn, int Stages, int MinBlocks>
struct Cfg {
  static constexpr int kWarps = Warps, kMt = Mt, kBn = Bn, kStages = Stages;
  static constexpr int kMinBlocks = MinBlocks;
  static constexpr int kBq = 16 * kMt * kWarps;  // query rows per block
  template <typename T, int D>
  static constexpr size_t SmemBytes() {
    return size_t{kBq + 2 * kStages * kBk} * (D + 8) * sizeof(T);
  }
};

template <typename T, int D, typename C>
__global__ void __launch_bounds__(32 * C::kWarps, C::kMinBlocks)
    PrefillMmaKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                     const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out,
                     int heads, int kv_heads, float scale, bool all_rows) {
  PdlWaitAndTrigger();
  constexpr int kWarps = C::kWarps, kMt = C::kMt, kBn = C::kBn, kStages = C::kStages;
  constexpr int kBq = C::kBq, kThreads = 32 * kWarps, kWarpRows = 16 * kMt;
  constexpr int kLd = D + 8;                  // row stride (elements)
  constexpr int kVecs = D / 8;                // 16-byte pieces per row
  constexpr int kRowStep = kThreads / kVecs;  // rows between one thread's K/V pieces
  constexpr int kPieces = kBk / kRowStep;     // K (and V) pieces per thread per tile
  constexpr int kStageElems = 2 * kBk * kLd;  // one ring stage: K tile, then V tile
  constexpr uint32_t kStageBytes = kStageElems * sizeof(T);
  constexpr uint32_t kRowBytes = kLd * sizeof(T);
  static_assert(kThreads % kVecs == 0 && kBk % kRowStep == 0, "piece mapping");
  static_assert(kStages >= 2 && kBk % kBn == 0 && kBn % 16 == 0, "ring, passes");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ring = qs + kBq * kLd;

  const unsigned bx = blockIdx.x, nh = static_cast<unsigned>(heads);
  const unsigned ns = static_cast<unsigned>(batch.num_seqs);
  const int h = static_cast<int>(bx % nh);
  const int s = static_cast<int>((bx / nh) % ns);
  const int rank = static_cast<int>(bx / nh / ns);
  const int q0 = batch.cu_q[s];
  const int q_len = batch.cu_q[s + 1] - q0;
  if (!all_rows && q_len == 1) return;  // the decode kernel's
  const int tile = (q_len + kBq - 1) / kBq - 1 - rank;
  if (tile < 0) return;
  const int row0 = tile * kBq;
  const int rows = min(kBq, q_len - row0);
  const int first = q0 + row0;  // the block's first query row (token)
  const int prefix = batch.kv_lens[s] - q_len;
  const int kvh = h / (heads / kv_heads);
  const int kv_end = prefix + row0 + rows;  // the block reads positions [0, kv_end) only
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int wrow = warp * kWarpRows;

  // Q, then the K/V tiles, arrive by cp.async (16 bytes, zero-filled past the data).
  for (int i = tid; i < kBq * kVecs; i += kThreads) {
    const int r = i / kVecs, c = (i % kVecs) * 8;
    const bool valid = r < rows;
    CpAsync16(qs + r * kLd + c, valid ? q + int64_t{first + r} * q_stride + h * D + c : q, valid);
  }
  // A thread copies the same 16-byte column piece of rows piece_r + i kRowStep of each tile;
  // position pos lives at ((table[pos / bs] kv_heads + kvh) bs + pos % bs) D of the cache.
  const int32_t* table = batch.block_tables + int64_t{s} * batch.max_blocks;
  const int bs = batch.block_size;
  const bool bs_pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const int block_elems = kv_heads * bs * D;  // elements of one cache block
  const int piece_c = (tid % kVecs) * 8, piece_r = tid / kVecs;
  const int head_off = kvh * bs * D + piece_c;
  auto load_tile = [&](int kt, uint32_t stage_off) {
    T* kd = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(ring) + stage_off) +
            piece_r * kLd + piece_c;
    T* vd = kd + kBk * kLd;
    auto issue = [&](int i, int blk, int in, bool valid) {
      int64_t off = 0;
      if (valid) off = int64_t{__ldg(table + blk)} * block_elems + (head_off + in * D);
      CpAsync16(kd + i * kRowStep * kLd, k_cache + off, valid);
      CpAsync16(vd + i * kRowStep * kLd, v_cache + off, valid);
    };
    const int pos0 = kt + piece_r;
    if (bs_pow2) {  // uniform: shifts instead of a division per piece
#pragma unroll
      for (int i = 0; i < kPieces; ++i) {
        const int pos = pos0 + i * kRowStep;
        issue(i, pos >> bs_shift, pos & (bs - 1), pos < kv_end);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPieces; ++i) {
        const int pos = pos0 + i * kRowStep, blk = pos / bs;
        issue(i, blk, pos - blk * bs, pos < kv_end);
      }
    }
  };
  // Groups: the first holds Q and tile 0; one group per tile after that (empty past the end),
  // so at the tile at kt waiting for all but the newest kStages - 2 groups lands it.
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st * kBk < kv_end) load_tile(st * kBk, st * kStageBytes);
    CpAsyncCommit();
  }
  CpAsyncWait<kStages - 2>();
  __syncthreads();
  // Scores go to the exp2 domain through c = |scale| log2(e) (at least FLT_MIN, so masked
  // scores of -inf stay -inf); a negative scale negates Q instead, exactly.
  const float c = fmaxf(fabsf(scale) * 1.4426950408889634f, FLT_MIN);
  if (scale < 0.0f) {
    for (int i = tid; i < kBq * kVecs; i += kThreads) {
      uint4* p = reinterpret_cast<uint4*>(qs + (i / kVecs) * kLd + (i % kVecs) * 8);
      uint4 v = *p;
      v.x ^= 0x80008000u;
      v.y ^= 0x80008000u;
      v.z ^= 0x80008000u;
      v.w ^= 0x80008000u;
      *p = v;
    }
    __syncthreads();
  }

  const uint32_t qs_addr = static_cast<uint32_t>(__cvta_generic_to_shared(qs));
  const uint32_t ring_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  // ldmatrix lane addresses. A fragments of Q (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15):
  // lane l names row l % 16, k offset 8 (l / 16). K as B (n = position, k = dim; matrices:
  // n-tile a k 0-7, n-tile a k 8-15, n-tile b k 0-7, n-tile b k 8-15): row (l % 8) + 8 (l / 16),
  // k offset 8 ((l / 8) % 2). V as B by .trans (k = position, n = dim; matrices: positions
  // 0-7 / 8-15 of d-tile a, then of d-tile b): row l % 16, d offset 8 (l / 16).
  const uint32_t q_lane = qs_addr + (wrow + (lane & 15)) * kRowBytes + (lane >> 4) * 8 * sizeof(T);
  const uint32_t k_lane =
      ring_addr + ((lane & 7) + ((lane >> 4) << 3)) * kRowBytes + ((lane >> 3) & 1) * 8 * sizeof(T);
  const uint32_t v_lane = ring_addr + (kBk + (lane & 15)) * kRowBytes + (lane >> 4) * 8 * sizeof(T);

  uint32_t qf[kMt == 1 ? D / 16 : 1][4];
  if constexpr (kMt == 1) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) LdMatrixX4(qf[kk], q_lane + kk * 16 * sizeof(T));
  }
  float o[kMt][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
  }
  // Per m-tile, this lane's two rows wrow + 16 mt + g and that + 8: running maximum (raw
  // score) and this lane's share of the running sum (summed over the quad at the end).
  float m[kMt][2], l[kMt][2];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }
  const int warp_first = prefix + row0 + wrow;  // position of the warp's first row
  const int warp_rows = min(kWarpRows, rows - wrow);
  // The last position a row of this warp may see (-1: no row of the warp is in the sequence).
  const int warp_last = warp_rows > 0 ? warp_first + warp_rows - 1 : -1;

  constexpr uint32_t kLastStage = (kStages - 1) * kStageBytes;
  uint32_t st = 0;  // byte offset of the ring stage of the tile at kt
  for (int kt = 0; kt < kv_end; kt += kBk) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // the tile has landed for every thread; every warp is done with the last
    // The tile kStages - 1 ahead goes into the stage the last tile used.
    if (kt + (kStages - 1) * kBk < kv_end) {
      load_tile(kt + (kStages - 1) * kBk, st == 0 ? kLastStage : st - kStageBytes);
    }
    CpAsyncCommit();
    const uint32_t st_addr = st;
    st = st == kLastStage ? 0 : st + kStageBytes;
    // The tile in passes of kBn positions; a pass starting after the warp's last row is
    // skipped.
#pragma unroll
    for (int sub = 0; sub < kBk / kBn; ++sub) {
      const int ct = kt + sub * kBn;  // position of the pass's first column
      if (ct > warp_last) break;
      const uint32_t k_pass = st_addr + k_lane + sub * kBn * kRowBytes;
      const uint32_t v_pass = st_addr + v_lane + sub * kBn * kRowBytes;
      float sacc[kMt][kBn / 8][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
        for (int n = 0; n < kBn / 8; ++n) {
          sacc[mt][n][0] = sacc[mt][n][1] = sacc[mt][n][2] = sacc[mt][n][3] = 0.0f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[kMt][4];
        if constexpr (kMt == 1) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[0][i] = qf[kk][i];
        } else {
#pragma unroll
          for (int mt = 0; mt < kMt; ++mt) {
            LdMatrixX4(a[mt], q_lane + mt * 16 * kRowBytes + kk * 16 * sizeof(T));
          }
        }
#pragma unroll
        for (int np = 0; np < kBn / 16; ++np) {
          uint32_t b[4];
          LdMatrixX4(b, k_pass + np * 16 * kRowBytes + kk * 16 * sizeof(T));
#pragma unroll
          for (int mt = 0; mt < kMt; ++mt) {
            Mma16816<T>(sacc[mt][2 * np], a[mt], b[0], b[1]);
            Mma16816<T>(sacc[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
      // Causal mask, only where the pass reaches past the warp's first row: column
      // ct + 8 n + 2 tig + e is visible to a row at position p iff 8 n + e <= p - ct - 2 tig.
      if (ct + kBn - 1 > warp_first) {
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int lim = warp_first + mt * 16 + hr * 8 + g - ct - 2 * tig;
#pragma unroll
            for (int n = 0; n < kBn / 8; ++n) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                if (n * 8 + e > lim) sacc[mt][n][hr * 2 + e] = -INFINITY;
              }
            }
          }
        }
      }
      // Online softmax; P as the A fragments of P V: k-step i covers n-tiles 2i (positions
      // 0-7) and 2i + 1 (8-15).
      uint32_t pf[kMt][kBn / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < kBn / 8; ++n) {
          mx0 = fmaxf(mx0, fmaxf(sacc[mt][n][0], sacc[mt][n][1]));
          mx1 = fmaxf(mx1, fmaxf(sacc[mt][n][2], sacc[mt][n][3]));
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mo0 = m[mt][0], mo1 = m[mt][1];
        const float mn0 = fmaxf(mo0, mx0), mn1 = fmaxf(mo1, mx1);
        m[mt][0] = mn0;
        m[mt][1] = mn1;
        // Scaled references (0 while a row has seen nothing, so that -inf - ref stays -inf).
        const float ref0 = mn0 == -INFINITY ? 0.0f : __fmul_rn(mn0, c);
        const float ref1 = mn1 == -INFINITY ? 0.0f : __fmul_rn(mn1, c);
        // Rescale the row's sums by 2^(old ref - new ref), the old one computed as it was
        // (-inf before any term: factor 0); skipped when no row of the warp has a new maximum.
        if (__any_sync(0xffffffffu, mn0 > mo0 || mn1 > mo1)) {
          const float alpha0 = Exp2(__fmul_rn(mo0, c) - ref0);
          const float alpha1 = Exp2(__fmul_rn(mo1, c) - ref1);
          l[mt][0] *= alpha0;
          l[mt][1] *= alpha1;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            o[mt][n][0] *= alpha0;
            o[mt][n][1] *= alpha0;
            o[mt][n][2] *= alpha1;
            o[mt][n][3] *= alpha1;
          }
        }
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int n = 0; n < kBn / 8; ++n) {
          const float p00 = Exp2(fmaf(sacc[mt][n][0], c, -ref0));
          const float p01 = Exp2(fmaf(sacc[mt][n][1], c, -ref0));
          const float p10 = Exp2(fmaf(sacc[mt][n][2], c, -ref1));
          const float p11 = Exp2(fmaf(sacc[mt][n][3], c, -ref1));
          sum0 += p00 + p01;
          sum1 += p10 + p11;
          pf[mt][n / 2][(n % 2) * 2] = Pack<T>(p00, p01);
          pf[mt][n / 2][(n % 2) * 2 + 1] = Pack<T>(p10, p11);
        }
        l[mt][0] += sum0;
        l[mt][1] += sum1;
      }
#pragma unroll
      for (int i = 0; i < kBn / 16; ++i) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          LdMatrixX4Trans(b, v_pass + i * 16 * kRowBytes + dp * 16 * sizeof(T));
#pragma unroll
          for (int mt = 0; mt < kMt; ++mt) {
            Mma16816<T>(o[mt][2 * dp], pf[mt][i], b[0], b[1]);
            Mma16816<T>(o[mt][2 * dp + 1], pf[mt][i], b[2], b[3]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
    float l0 = l[mt][0], l1 = l[mt][1];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    const int r0 = wrow + mt * 16 + g, r1 = r0 + 8;
    T* out0 = out + (int64_t{first + r0} * heads + h) * D + tig * 2;
    T* out1 = out + (int64_t{first + r1} * heads + h) * D + tig * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      if (r0 < rows) {
        *reinterpret_cast<uint32_t*>(out0 + n * 8) =
            Pack<T>(o[mt][n][0] * inv0, o[mt][n][1] * inv0);
      }
      if (r1 < rows) {
        *reinterpret_cast<uint32_t*>(out1 + n * 8) =
            Pack<T>(o[mt][n][2] * inv1, o[mt][n][3] * inv1);
      }
    }
  }
}

template <typename T, int D, typename C>
cudaError_t Launch(const AttentionArgs& a, bool all_rows, cudaStream_t stream) {
  auto* kernel = PrefillMmaKernel<T, D, C>;
  constexpr size_t smem = C::template SmemBytes<T, D>();
  static_assert(smem <= 227 * 1024, "shared memory of one block");
  if (const cudaError_t e = AllowDynamicSmem(kernel, smem); e != cudaSuccess) return e;
  const int64_t tiles = (int64_t{a.plan.max_q_len} + C::kBq - 1) / C::kBq;
  const int64_t blocks = tiles * a.batch.num_seqs * a.heads;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  LaunchKernel(kernel, static_cast<unsigned>(blocks), 32 * C::kWarps, smem, stream,
               static_cast<const T*>(a.q), a.q_stride, static_cast<const T*>(a.k_cache),
               static_cast<const T*>(a.v_cache), a.batch, static_cast<T*>(a.out),
               static_cast<int>(a.heads), static_cast<int>(a.kv_heads), a.scale, all_rows);
  return cudaGetLastError();
}

// Query tiles: by default 4 warps of 32 rows (128-row tiles, Q fragments reloaded from shared
// memory). PDS_ATTN_PREFILL_WARPS=4 (KernelSettings) picks 4 warps of 16 rows (64-row tiles) and =8
// picks 8 warps of 16 rows (128-row tiles), both with Q fragments in registers, for measurements.
// Ring depth: 3 stages where two or three blocks still fit an SM, else 2.
template <typename T, int D>
cudaError_t LaunchTile(const AttentionArgs& a, bool all_rows, cudaStream_t stream) {
  const int warps = Settings().prefill_warps;
  if constexpr (D == 64) {  // 3 stages; 3 blocks per SM of 4 warps, 2 of 8
    if (warps == 4) return Launch<T, D, Cfg<4, 1, 64, 3, 3>>(a, all_rows, stream);
    if (warps == 8) return Launch<T, D, Cfg<8, 1, 32, 3, 2>>(a, all_rows, stream);
    return Launch<T, D, Cfg<4, 2, 32, 3, 3>>(a, all_rows, stream);
  } else {  // 2 blocks per SM of 4 warps with 2 stages; 8 warps: 1 block, so 3 stages fit
    if (warps == 4) return Launch<T, D, Cfg<4, 1, 64, 2, 2>>(a, all_rows, stream);
    if (warps == 8) return Launch<T, D, Cfg<8, 1, 64, 3, 1>>(a, all_rows, stream);
    return Launch<T, D, Cfg<4, 2, 32, 2, 2>>(a, all_rows, stream);
  }
}

}  // namespace

cudaError_t LaunchPrefillAttentionMma(Half16 t, const AttentionArgs& a, bool all_rows,
                                      cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) -> cudaError_t {
    using T = decltype(z);
    if (a.head_dim == 64) return LaunchTile<T, 64>(a, all_rows, stream);
    if (a.head_dim == 128) return LaunchTile<T, 128>(a, all_rows, stream);
    return cudaErrorInvalidValue;
  });
}

}  // namespace pds::kernels::cuda
