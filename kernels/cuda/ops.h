// CUDA kernels of the forward pass, each the twin of a CPU op in kernels/*.h (same shapes and
// layouts; see there), on 16-bit activations (bf16 or fp16) with fp32 accumulation. Every
// launcher enqueues on `stream` and returns the launch status; none synchronizes. Pointers
// are device memory, including the index arrays (ids, positions, slots, PagedBatch fields).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/sampling.h"

namespace pds::kernels::cuda {

enum class Half16 : uint8_t { kBF16, kF16 };

// --- elementwise.cu ---
cudaError_t Embed(Half16 t, const void* table, const int32_t* ids, void* out, int64_t tokens,
                  int64_t hidden, cudaStream_t stream);
cudaError_t AddBias(Half16 t, void* x, int64_t x_stride, const void* bias, int64_t rows,
                    int64_t cols, cudaStream_t stream);
cudaError_t Add(Half16 t, void* x, const void* y, int64_t n, cudaStream_t stream);
cudaError_t SiluGate(Half16 t, const void* gate_up, void* out, int64_t tokens, int64_t inter,
                     cudaStream_t stream);
cudaError_t GatherRows(Half16 t, const void* x, const int32_t* rows, void* out, int64_t n,
                       int64_t cols, cudaStream_t stream);
// dst[i] = RandomFillValue(seed, i, scale, offset) (kernels/random_fill.h), rounded.
cudaError_t FillRandom(Half16 t, void* dst, int64_t n, float scale, float offset, uint64_t seed,
                       cudaStream_t stream);

// --- elementwise.cu: launch settings ---
// The launchers' choices, read from the environment once (first use) and again by
// ReloadKernelSettings(), which tests and benchmarks call after changing the variables: the
// launch path never reads the environment.
struct KernelSettings {
  // Programmatic dependent launch (the next kernel scheduled while the previous one runs):
  // compute capability 9.0 and later, unless PDS_PDL=0. CUDA graphs keep the setting they were
  // recorded with.
  bool programmatic_launch = false;
  bool legacy_decode = false;  // PDS_ATTN_DECODE=legacy: the register-loading decode kernel
  bool mma_decode = false;     // PDS_ATTN_DECODE=mma: the tensor-core decode kernel (D 64, 128)
  int prefill_warps = 0;       // PDS_ATTN_PREFILL_WARPS=4|8: 16-row-per-warp prefill tiles
  bool gemv_mma = false;       // PDS_GEMV_IMPL=mma: the tensor-core GEMV at every m
  int gemv_warps = 0;          // PDS_GEMV_WARPS (1-16): its warps per block; 0: heuristic
  bool gemv_unroll8 = false;   // PDS_GEMV_UNROLL=8: its deeper loads in flight
  bool fuse_rope_kv = false;   // PDS_FUSE_ROPE_KV=1: RoPE and the KV write in one launch
  // PDS_ATTN_COMBINE=fused: decode splits merged by the block that finishes last (given
  // PagedAttention's split counters) instead of by a second launch.
  bool fused_combine = false;
};
const KernelSettings& Settings();
void ReloadKernelSettings();
bool ProgrammaticLaunch();  // Settings().programmatic_launch
void SetProgrammaticLaunch(bool on);

// --- gemv.cu ---
// The most activation rows Gemv takes (the N of one m16n8k16 tensor-core step).
constexpr int64_t kGemvMaxRows = 8;
// Up to this many rows Gemv streams weight rows through FMAs; above it (or with
// PDS_GEMV_IMPL=mma) it uses the tensor-core kernel.
constexpr int64_t kGemvFmaRows = 4;
// What CudaBackend takes Gemv for by default (PDS_GEMV_MAX_ROWS overrides): one row, where the
// FMA kernel measured 1.04x cuBLAS over a llama3-8b step's matrices on the H100; at 8 rows
// the tensor-core kernel measured 0.84x, and 2-4 rows are not measured yet.
constexpr int64_t kGemvDefaultRows = 1;
// Whether Gemv takes these operands: 1 <= m <= kGemvMaxRows, k a positive multiple of 8, a and
// w 16-byte aligned, and (for m > 1) lda a multiple of 8 and at least k.
bool GemvSupported(const void* a, int64_t lda, const void* w, int64_t k, int64_t m);
// Skinny GEMM for decode, bound by reading w once: c[m, n] = a[m, k] w[n, k]^T, a with row
// stride lda (elements), w [n, k] contiguous, c [m, n] contiguous, fp32 accumulation; c is T
// or, with c_fp32, fp32 (the logits). cudaErrorInvalidValue (nothing launched) when
// !GemvSupported; m <= 0 or n <= 0 do nothing. No allocation, no synchronization (safe to
// record in a CUDA graph); deterministic for a given m. Measurement knobs: the gemv_* fields of
// KernelSettings.
cudaError_t Gemv(Half16 t, const void* a, int64_t lda, const void* w, int64_t n, int64_t k, void* c,
                 bool c_fp32, int64_t m, cudaStream_t stream);

// --- norm.cu ---
cudaError_t RmsNorm(Half16 t, const void* x, int64_t x_stride, const void* w, void* out,
                    int64_t out_stride, int64_t rows, int64_t cols, float eps, cudaStream_t stream);
// residual += delta (rounded to 16 bits); out = RmsNorm(residual). Contiguous rows.
cudaError_t AddRmsNorm(Half16 t, void* residual, const void* delta, const void* w, void* out,
                       int64_t rows, int64_t cols, float eps, cudaStream_t stream);
cudaError_t HeadRmsNorm(Half16 t, void* x, int64_t token_stride, const void* w, int64_t tokens,
                        int64_t heads, int64_t head_dim, float eps, cudaStream_t stream);

// --- rope.cu ---
// cos/sin tables [tokens, half] (fp32; angles in double as on the CPU).
cudaError_t RopeCosSin(const int32_t* positions, const float* inv_freq, float* cos, float* sin,
                       int64_t tokens, int64_t half, cudaStream_t stream);
// In place on q ([tokens, q_heads, 2 half]) and k ([tokens, kv_heads, 2 half]), both with
// token stride token_stride.
cudaError_t ApplyRope(Half16 t, void* q, void* k, int64_t token_stride, const float* cos,
                      const float* sin, int64_t tokens, int64_t q_heads, int64_t kv_heads,
                      int64_t half, cudaStream_t stream);
// ApplyRope on q and k, then WriteKv of the rotated k and of v (same strides; slots [tokens],
// negative: not written), in one launch; the same results as the two launches.
cudaError_t RopeWriteKv(Half16 t, void* q, void* k, const void* v, int64_t token_stride,
                        const float* cos, const float* sin, const int32_t* slots, int64_t tokens,
                        int64_t q_heads, int64_t kv_heads, int64_t half, void* k_cache,
                        void* v_cache, int64_t block_size, cudaStream_t stream);

// --- kv_cache.cu ---
cudaError_t WriteKv(Half16 t, const void* k, const void* v, int64_t kv_stride, const int32_t* slots,
                    int64_t tokens, void* k_cache, void* v_cache, int64_t kv_heads,
                    int64_t block_size, int64_t head_dim, cudaStream_t stream);

// Copies `count` cache blocks of `block_bytes` (a multiple of 16) for layers
// [layer_begin, layer_end), K and V: block src_blocks[i] of src to block dst_blocks[i] of dst,
// where layer l's K pool starts at 2 l * pool_bytes and its V pool right after (each side
// with its own pool_bytes). dst may be a peer process's pool opened through CUDA IPC. One
// launch instead of a copy per block run (KV hand-off between differently paged caches).
cudaError_t CopyBlocks(const void* src, size_t src_pool_bytes, void* dst, size_t dst_pool_bytes,
                       const int32_t* src_blocks, const int32_t* dst_blocks, int32_t count,
                       int32_t layer_begin, int32_t layer_end, size_t block_bytes,
                       cudaStream_t stream);

// --- attention_decode.cu / attention_prefill.cu ---
// Workspace and launch plan of one PagedAttention call, decided on the host from the batch.
struct AttentionPlan {
  bool has_decode_rows = false;   // some sequence has exactly one query row
  bool has_prefill_rows = false;  // some sequence has more
  int32_t max_q_len = 0;          // longest query run of a sequence in the batch
  int32_t max_kv_len = 0;         // longest context
  int32_t num_sms = 132;
  // Decode split-KV: tokens per split and splits (set by PlanAttention).
  int32_t split_tokens = 0;
  int32_t num_splits = 0;
};
// Fills the split decision; returns the fp32 workspace bytes the decode kernel needs.
size_t PlanAttention(AttentionPlan& plan, int32_t num_seqs, int64_t heads, int64_t kv_heads,
                     int64_t head_dim);
// Whether these head dims are supported (16, 32, 64, 128, 256).
bool AttentionHeadDimSupported(int64_t head_dim);
// Sequences with one query row run the split-KV decode kernel (CUDA cores, GQA heads sharing
// each K/V load); sequences with more run the tiled tensor-core kernel (online softmax, K/V
// tiles gathered from the block table into shared memory). `workspace` holds
// PlanAttention's bytes. q_stride must be a multiple of 8 elements and q, out and the caches
// 16-byte aligned (cudaErrorInvalidValue otherwise, as for an unsupported head dim or a
// head count that is not a multiple of kv_heads). `split_counters` (optional): `slots`
// zero-filled ints of device memory, kept by the caller across calls, with which the decode
// kernel merges its splits without a second launch (KernelSettings::fused_combine; it needs
// seqs x heads slots at most and leaves them zero); null, or too few: a combine launch.
cudaError_t PagedAttention(Half16 t, const void* q, int64_t q_stride, const void* k_cache,
                           const void* v_cache, const PagedBatch& batch, const AttentionPlan& plan,
                           void* out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           float scale, void* workspace, cudaStream_t stream,
                           int32_t* split_counters = nullptr, int64_t split_counter_slots = 0);

// --- sampling.cu ---
// tokens[r] = the token of logits row r under sampling[r] ([rows] in device memory), by the
// rule of cpu::SampleLogits: candidates in descending (logit, then lower index) order, the
// top_k first, then the shortest prefix whose probability reaches top_p, then the first
// candidate whose cumulative probability exceeds u. Selection is by radix passes over the
// (logit, index) keys weighted by count or probability (fp32 exp, fp64 sums), no sort; the
// sums are atomics, so a draw within ~1e-15 of a boundary may differ from the CPU's.
cudaError_t SampleRows(const float* logits, int64_t rows, int64_t n, const RowSampling* sampling,
                       int32_t* tokens, cudaStream_t stream);
// ids[r] = argmax of logits row r ([rows, n] fp32; lowest index on ties, NaN never chosen).
cudaError_t ArgmaxRows(const float* logits, int64_t rows, int64_t n, int32_t* ids,
                       cudaStream_t stream);

}  // namespace pds::kernels::cuda
