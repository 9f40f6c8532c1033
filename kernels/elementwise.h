// Small elementwise ops of the transformer block.
#pragma once

#include <cstdint>

namespace pds::kernels::cpu {

// out[t, :] = table[ids[t], :]; table: [vocab, hidden]; out: [tokens, hidden].
void Embed(const float* table, const int32_t* ids, float* out, int64_t tokens, int64_t hidden);

// x[r, c] += bias[c]; x: [rows, cols] row stride x_stride.
void AddBias(float* x, int64_t x_stride, const float* bias, int64_t rows, int64_t cols);

// x[i] += y[i] for i < n.
void Add(float* x, const float* y, int64_t n);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]; gate_up: [tokens, 2 * inter]
// (gate half first); out: [tokens, inter].
void SiluGate(const float* gate_up, float* out, int64_t tokens, int64_t inter);

// out[r, :] = x[rows[r], :]; x: [*, cols]; out: [n, cols].
void GatherRows(const float* x, const int32_t* rows, float* out, int64_t n, int64_t cols);

}  // namespace pds::kernels::cpu
