#include "engine/model/transformer.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"

namespace pds::engine {
namespace {

void* Offset(void* p, int64_t elements, DType dtype) {
  return static_cast<char*>(p) + elements * static_cast<int64_t>(DTypeSize(dtype));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Load(const std::string& dir,
                                                               Backend& backend) {
  PDS_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  PDS_ASSIGN_OR_RETURN(WeightFiles files, WeightFiles::Open(dir));
  return Load(config, files, backend);
}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Load(const ModelConfig& config,
                                                               const WeightFiles& files,
                                                               Backend& backend) {
  std::unique_ptr<Transformer> model(new Transformer(config, backend));
  model->inv_freq_ = RopeInvFreq(config);
  Backend* be = &backend;
  PDS_RETURN_IF_ERROR(
      model->LoadWeights([&files, be](const std::vector<std::pair<std::string, int64_t>>& parts,
                                      int64_t cols) -> absl::StatusOr<Weight> {
        Weight w;
        w.cols = std::max<int64_t>(cols, 1);
        for (const auto& [name, rows] : parts) w.rows += rows;
        std::vector<TensorView> views;
        for (const auto& [name, rows] : parts) {
          std::vector<int64_t> shape =
              cols > 0 ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{rows};
          PDS_ASSIGN_OR_RETURN(TensorView view, files.Get(name, shape));
          views.push_back(view);
        }
        const std::string what =
            parts.size() == 1 ? parts[0].first : absl::StrCat(parts[0].first, "+");
        if (views.size() == 1) {
          PDS_ASSIGN_OR_RETURN(w.buffer,
                               be->Upload(views[0].data, views[0].dtype, views[0].numel(), what));
        } else {
          // Convert the parts to fp32 on the host, stack them, upload once.
          std::vector<float> stacked(static_cast<size_t>(w.rows * w.cols));
          size_t at = 0;
          for (const auto& v : views) {
            ConvertToFloat(v.dtype, v.data, stacked.data() + at, v.numel());
            at += v.numel();
          }
          PDS_ASSIGN_OR_RETURN(w.buffer,
                               be->Upload(stacked.data(), DType::kF32, stacked.size(), what));
        }
        return w;
      }));
  Logger("model")->info(
      "loaded {} from {}: {} layers, hidden {}, {:.1f}M parameters, {} file(s), {} MB on {}",
      config.architecture_name, files.dir(), config.num_layers, config.hidden_size,
      config.num_parameters() / 1e6, files.num_files(), model->weight_bytes_ >> 20, backend.name());
  return model;
}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::CreateRandom(const ModelConfig& config,
                                                                       Backend& backend,
                                                                       uint64_t seed) {
  std::unique_ptr<Transformer> model(new Transformer(config, backend));
  model->inv_freq_ = RopeInvFreq(config);
  Backend* be = &backend;
  uint64_t counter = seed * 1000003ull;
  const size_t esize = DTypeSize(backend.compute_dtype());
  PDS_RETURN_IF_ERROR(model->LoadWeights(
      [be, &counter, esize](const std::vector<std::pair<std::string, int64_t>>& parts,
                            int64_t cols) -> absl::StatusOr<Weight> {
        Weight w;
        w.cols = std::max<int64_t>(cols, 1);
        for (const auto& [name, rows] : parts) w.rows += rows;
        const size_t count = static_cast<size_t>(w.rows * w.cols);
        PDS_ASSIGN_OR_RETURN(w.buffer, be->Allocate(count * esize, parts[0].first));
        const std::string& name = parts[0].first;
        float scale, offset = 0.0f;
        if (cols == 0) {
          const bool norm = name.find("norm") != std::string::npos;
          scale = norm ? 0.1f : 0.02f;
          offset = norm ? 1.0f : 0.0f;
        } else if (name.find("embed_tokens") != std::string::npos) {
          scale = 1.0f;
        } else {
          scale = static_cast<float>(std::sqrt(3.0 / static_cast<double>(cols)));
        }
        PDS_RETURN_IF_ERROR(be->FillRandom(w.buffer.data(), count, scale, offset, ++counter));
        return w;
      }));
  Logger("model")->info("random {} weights: {} layers, hidden {}, {:.2f}B parameters, {} MB on {}",
                        config.architecture_name, config.num_layers, config.hidden_size,
                        config.num_parameters() / 1e9, model->weight_bytes_ >> 20, backend.name());
  return model;
}

absl::Status Transformer::LoadWeights(const WeightMaker& make) {
  const ModelConfig& c = config_;
  auto load = [&](std::vector<std::pair<std::string, int64_t>> parts,
                  int64_t cols) -> absl::StatusOr<Weight> {
    PDS_ASSIGN_OR_RETURN(Weight w, make(parts, cols));
    weight_bytes_ += w.rows * w.cols * DTypeSize(backend_.compute_dtype());
    return w;
  };

  const int64_t H = c.hidden_size, Q = c.q_size(), KV = c.kv_size(), I = c.intermediate_size;
  PDS_ASSIGN_OR_RETURN(embed_, load({{"model.embed_tokens.weight", c.vocab_size}}, H));
  PDS_ASSIGN_OR_RETURN(final_norm_, load({{"model.norm.weight", H}}, 0));
  if (c.tie_word_embeddings) {
    lm_head_ = &embed_;
  } else {
    PDS_ASSIGN_OR_RETURN(lm_head_own_, load({{"lm_head.weight", c.vocab_size}}, H));
    lm_head_ = &lm_head_own_;
  }
  layers_.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerWeights& L = layers_[l];
    PDS_ASSIGN_OR_RETURN(L.input_norm, load({{p + "input_layernorm.weight", H}}, 0));
    PDS_ASSIGN_OR_RETURN(L.qkv, load({{p + "self_attn.q_proj.weight", Q},
                                      {p + "self_attn.k_proj.weight", KV},
                                      {p + "self_attn.v_proj.weight", KV}},
                                     H));
    if (c.qkv_bias) {
      PDS_ASSIGN_OR_RETURN(L.qkv_bias, load({{p + "self_attn.q_proj.bias", Q},
                                             {p + "self_attn.k_proj.bias", KV},
                                             {p + "self_attn.v_proj.bias", KV}},
                                            0));
    }
    if (c.qk_norm) {
      PDS_ASSIGN_OR_RETURN(L.q_norm, load({{p + "self_attn.q_norm.weight", c.head_dim}}, 0));
      PDS_ASSIGN_OR_RETURN(L.k_norm, load({{p + "self_attn.k_norm.weight", c.head_dim}}, 0));
    }
    PDS_ASSIGN_OR_RETURN(L.o, load({{p + "self_attn.o_proj.weight", H}}, Q));
    if (c.o_bias) {
      PDS_ASSIGN_OR_RETURN(L.o_bias, load({{p + "self_attn.o_proj.bias", H}}, 0));
    }
    PDS_ASSIGN_OR_RETURN(L.post_norm, load({{p + "post_attention_layernorm.weight", H}}, 0));
    PDS_ASSIGN_OR_RETURN(L.gate_up,
                         load({{p + "mlp.gate_proj.weight", I}, {p + "mlp.up_proj.weight", I}}, H));
    PDS_ASSIGN_OR_RETURN(L.down, load({{p + "mlp.down_proj.weight", H}}, I));
  }
  return absl::OkStatus();
}

KvCacheShape Transformer::CacheShape(int32_t num_blocks, int32_t block_size) const {
  KvCacheShape shape;
  shape.num_layers = static_cast<int32_t>(config_.num_layers);
  shape.num_blocks = num_blocks;
  shape.block_size = block_size;
  shape.kv_heads = static_cast<int32_t>(config_.num_kv_heads);
  shape.head_dim = static_cast<int32_t>(config_.head_dim);
  return shape;
}

absl::Status Transformer::BuildMetadata(std::span<const SequenceInput> seqs, const KvCache& cache) {
  const KvCacheShape& cs = cache.shape();
  if (cs.num_layers != config_.num_layers || cs.kv_heads != config_.num_kv_heads ||
      cs.head_dim != config_.head_dim) {
    return absl::InvalidArgumentError("KV cache shape does not match the model");
  }
  BatchMetadata& m = meta_;
  m.token_ids.clear();
  m.positions.clear();
  m.slots.clear();
  m.cu_q.assign(1, 0);
  m.kv_lens.clear();
  m.last_rows.clear();
  m.block_size = cs.block_size;
  m.max_blocks = 0;
  for (const SequenceInput& s : seqs) {
    if (s.table == nullptr) return absl::InvalidArgumentError("sequence without a block table");
    if (s.tokens.empty()) return absl::InvalidArgumentError("sequence with no new tokens");
    const int64_t kv_len = static_cast<int64_t>(s.start_pos) + s.tokens.size();
    if (s.start_pos < 0 || kv_len > config_.max_context()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence length ", kv_len, " exceeds the model's context of ", config_.max_context()));
    }
    if (BlockTable::BlocksFor(static_cast<int32_t>(kv_len), cs.block_size) >
        static_cast<int32_t>(s.table->blocks().size())) {
      return absl::InvalidArgumentError(absl::StrCat("block table holds ", s.table->blocks().size(),
                                                     " blocks, too few for ", kv_len, " tokens"));
    }
    m.max_blocks = std::max<int32_t>(m.max_blocks, s.table->blocks().size());
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      const int32_t id = s.tokens[i];
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " outside the vocabulary [0, ", config_.vocab_size, ")"));
      }
      const int32_t pos = s.start_pos + static_cast<int32_t>(i);
      m.token_ids.push_back(id);
      m.positions.push_back(pos);
      m.slots.push_back(s.table->Slot(pos, cs.block_size));
    }
    m.cu_q.push_back(static_cast<int32_t>(m.token_ids.size()));
    m.kv_lens.push_back(static_cast<int32_t>(kv_len));
    m.last_rows.push_back(static_cast<int32_t>(m.token_ids.size()) - 1);
  }
  // Decode batches that may replay a CUDA graph get a block-table width padded to the
  // backend's bucket (the padding is never read: attention reads positions < kv_len).
  const int32_t bucket = backend_.graph_block_bucket();
  if (bucket > 0 && m.num_tokens() == m.num_seqs()) {
    m.max_blocks = (m.max_blocks + bucket - 1) / bucket * bucket;
  }
  m.block_tables.assign(static_cast<size_t>(seqs.size()) * m.max_blocks, 0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto& blocks = seqs[s].table->blocks();
    std::copy(blocks.begin(), blocks.end(), m.block_tables.begin() + s * m.max_blocks);
  }
  return absl::OkStatus();
}

absl::Status Transformer::EnsureScratch(int64_t tokens, int64_t seqs) {
  if (tokens <= scratch_tokens_ && seqs <= scratch_seqs_) return absl::OkStatus();
  tokens = std::max(tokens, scratch_tokens_);
  seqs = std::max(seqs, scratch_seqs_);
  const ModelConfig& c = config_;
  const size_t e = DTypeSize(backend_.compute_dtype());
  auto alloc = [&](DeviceBuffer& buf, int64_t elements, const char* what) -> absl::Status {
    buf.Reset();
    PDS_ASSIGN_OR_RETURN(buf, backend_.Allocate(elements * e, what));
    return absl::OkStatus();
  };
  backend_.DropGraphs();  // recorded graphs point at the buffers being replaced
  PDS_RETURN_IF_ERROR(alloc(x_, tokens * c.hidden_size, "residual"));
  PDS_RETURN_IF_ERROR(alloc(h_, tokens * c.hidden_size, "normed"));
  PDS_RETURN_IF_ERROR(alloc(qkv_, tokens * (c.q_size() + 2 * c.kv_size()), "qkv"));
  PDS_RETURN_IF_ERROR(alloc(attn_, tokens * c.q_size(), "attention out"));
  PDS_RETURN_IF_ERROR(alloc(proj_, tokens * c.hidden_size, "projection"));
  PDS_RETURN_IF_ERROR(alloc(gate_up_, tokens * 2 * c.intermediate_size, "gate_up"));
  PDS_RETURN_IF_ERROR(alloc(act_, tokens * c.intermediate_size, "mlp act"));
  PDS_RETURN_IF_ERROR(alloc(last_, seqs * c.hidden_size, "last rows"));
  scratch_tokens_ = tokens;
  scratch_seqs_ = seqs;
  return absl::OkStatus();
}

absl::Status Transformer::Forward(std::span<const SequenceInput> seqs, KvCache& cache,
                                  std::vector<float>& logits) {
  PDS_RETURN_IF_ERROR(Body(seqs, cache));
  const int64_t B = meta_.num_seqs();
  logits.resize(static_cast<size_t>(B * config_.vocab_size));
  return backend_.Logits(last_.data(), *lm_head_, B, logits.data());
}

absl::Status Transformer::Forward(std::span<const SequenceInput> seqs, KvCache& cache,
                                  std::vector<float>& logits,
                                  const std::vector<kernels::RowSampling>& sampling,
                                  const std::vector<uint8_t>& host_rows,
                                  std::vector<int32_t>& tokens, const KvLayerHook& on_kv_layer,
                                  std::span<const int64_t> extra_rows,
                                  const std::vector<kernels::RowSampling>& extra_sampling) {
  if (sampling.size() != seqs.size() || host_rows.size() != seqs.size() ||
      extra_sampling.size() != extra_rows.size()) {
    return absl::InvalidArgumentError(
        "sampling and host_rows need one entry per sequence, extra_sampling one per extra row");
  }
  PDS_RETURN_IF_ERROR(Body(seqs, cache, on_kv_layer));
  const int64_t B = meta_.num_seqs();
  if (!extra_rows.empty()) {
    // The last rows and the extra ones gathered together (normalized as the last rows are),
    // then one projection and one draw for all.
    std::vector<int64_t> rows(meta_.last_rows.begin(), meta_.last_rows.end());
    rows.insert(rows.end(), extra_rows.begin(), extra_rows.end());
    const int64_t n = static_cast<int64_t>(rows.size());
    if (n > meta_.num_tokens()) {  // the gathered rows go in scratch of the batch's size
      return absl::InvalidArgumentError(absl::StrCat(extra_rows.size(), " extra rows and ", B,
                                                     " sequences' last rows in a batch of ",
                                                     meta_.num_tokens(), " tokens"));
    }
    PDS_RETURN_IF_ERROR(GatherRows(rows));
    std::vector<kernels::RowSampling> all = sampling;
    all.insert(all.end(), extra_sampling.begin(), extra_sampling.end());
    std::vector<uint8_t> host = host_rows;
    host.resize(static_cast<size_t>(n), 0);
    const size_t floats = static_cast<size_t>(n * config_.vocab_size);
    if (logits.size() < floats) logits.resize(floats);  // grown only
    tokens.resize(static_cast<size_t>(n));
    return backend_.SampleTokens(h_.data(), *lm_head_, n, all, host, logits.data(), tokens.data());
  }
  // Grown only: a step with extra rows may have grown it (resizing down and up again would
  // fill it anew); rows [0, B) are this step's.
  if (logits.size() < static_cast<size_t>(B * config_.vocab_size)) {
    logits.resize(static_cast<size_t>(B * config_.vocab_size));
  }
  tokens.resize(static_cast<size_t>(B));
  return backend_.SampleTokens(last_.data(), *lm_head_, B, sampling, host_rows, logits.data(),
                               tokens.data());
}

absl::Status Transformer::GatherRows(std::span<const int64_t> rows) {
  if (rows.empty()) return absl::InvalidArgumentError("no rows asked for");
  for (int64_t r : rows) {
    if (r < 0 || r >= meta_.num_tokens()) {
      return absl::OutOfRangeError(
          absl::StrCat("row ", r, " of a batch of ", meta_.num_tokens(), " tokens"));
    }
  }
  // x_ still holds every row's final hidden state (before the final norm); into h_ (free
  // scratch of the batch's size once the forward is done), runs of consecutive rows in one
  // copy, then normalized as the last rows are.
  const int64_t n = static_cast<int64_t>(rows.size());
  const DType dt = backend_.compute_dtype();
  const int64_t hidden = config_.hidden_size;
  const size_t row_bytes = static_cast<size_t>(hidden) * DTypeSize(dt);
  for (int64_t i = 0; i < n;) {
    int64_t run = 1;
    while (i + run < n && rows[i + run] == rows[i] + run) ++run;
    PDS_RETURN_IF_ERROR(backend_.CopyDevice(Offset(h_.data(), i * hidden, dt),
                                            Offset(x_.data(), rows[i] * hidden, dt),
                                            row_bytes * static_cast<size_t>(run)));
    i += run;
  }
  return backend_.RmsNorm(h_.data(), final_norm_, h_.data(), n,
                          static_cast<float>(config_.rms_norm_eps));
}

absl::Status Transformer::RowLogits(std::span<const int64_t> rows, std::vector<float>& logits) {
  PDS_RETURN_IF_ERROR(GatherRows(rows));
  const int64_t n = static_cast<int64_t>(rows.size());
  // Grown only: resizing down and up again would fill it anew every step.
  const size_t floats = static_cast<size_t>(n * config_.vocab_size);
  if (logits.size() < floats) logits.resize(floats);
  return backend_.Logits(h_.data(), *lm_head_, n, logits.data());
}

absl::Status Transformer::SampleRows(std::span<const int64_t> rows,
                                     const std::vector<kernels::RowSampling>& sampling,
                                     std::vector<float>& scratch, std::vector<int32_t>& tokens) {
  if (sampling.size() != rows.size()) {
    return absl::InvalidArgumentError("SampleRows needs one rule per row");
  }
  PDS_RETURN_IF_ERROR(GatherRows(rows));
  const int64_t n = static_cast<int64_t>(rows.size());
  const size_t scratch_floats = static_cast<size_t>(n * config_.vocab_size);
  if (scratch.size() < scratch_floats) scratch.resize(scratch_floats);  // grown only
  tokens.resize(static_cast<size_t>(n));
  const std::vector<uint8_t> host_rows(static_cast<size_t>(n), 0);
  return backend_.SampleTokens(h_.data(), *lm_head_, n, sampling, host_rows, scratch.data(),
                               tokens.data());
}

absl::Status Transformer::Body(std::span<const SequenceInput> seqs, KvCache& cache,
                               const KvLayerHook& on_kv_layer) {
  if (seqs.empty()) return absl::InvalidArgumentError("empty forward batch");
  PDS_RETURN_IF_ERROR(BuildMetadata(seqs, cache));
  const int64_t T = meta_.num_tokens();
  const int64_t B = meta_.num_seqs();
  PDS_RETURN_IF_ERROR(EnsureScratch(T, B));
  Backend& be = backend_;
  PDS_RETURN_IF_ERROR(be.BeginBatch(meta_));
  // Decode steps (one token per sequence) may replay a recorded graph of the ops below; the
  // key fixes everything the recorded launches depend on.
  Backend::GraphMode mode = Backend::GraphMode::kNone;
  if (be.graph_block_bucket() > 0 && T == B && !on_kv_layer) {
    uint64_t key = reinterpret_cast<uintptr_t>(this);
    for (uint64_t part : {static_cast<uint64_t>(reinterpret_cast<uintptr_t>(cache.data())),
                          static_cast<uint64_t>(T), static_cast<uint64_t>(meta_.max_blocks),
                          static_cast<uint64_t>(meta_.block_size)}) {
      key = (key ^ part) * 0x100000001B3ull + (key >> 29);
    }
    PDS_ASSIGN_OR_RETURN(mode, be.BeginGraph(key));
  }
  if (mode == Backend::GraphMode::kReplay) {
    PDS_ASSIGN_OR_RETURN(const bool ran, be.EndGraph());
    return ran ? absl::OkStatus() : Ops(cache);
  }
  const absl::Status status = Ops(cache, on_kv_layer);
  if (!status.ok()) {
    if (mode == Backend::GraphMode::kCapture) be.AbortGraph();
    return status;
  }
  if (mode == Backend::GraphMode::kNone) return absl::OkStatus();
  // A recording executes nothing: the graph runs now, or the ops run as usual.
  PDS_ASSIGN_OR_RETURN(const bool ran, be.EndGraph());
  return ran ? absl::OkStatus() : Ops(cache);
}

absl::Status Transformer::Ops(KvCache& cache, const KvLayerHook& on_kv_layer) {
  const ModelConfig& c = config_;
  const int64_t T = meta_.num_tokens();
  const int64_t B = meta_.num_seqs();
  Backend& be = backend_;
  const DType dt = be.compute_dtype();
  const int64_t qkv_stride = c.q_size() + 2 * c.kv_size();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  void* q = qkv_.data();
  void* k = Offset(q, c.q_size(), dt);
  void* v = Offset(k, c.kv_size(), dt);
  PDS_RETURN_IF_ERROR(be.Embed(embed_, x_.data(), c.hidden_size));
  PDS_RETURN_IF_ERROR(be.RmsNorm(x_.data(), layers_[0].input_norm, h_.data(), T, eps));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = layers_[l];
    // Attention block.
    PDS_RETURN_IF_ERROR(be.Gemm(h_.data(), c.hidden_size, L.qkv, q, T));
    if (c.qkv_bias) PDS_RETURN_IF_ERROR(be.AddBias(q, qkv_stride, L.qkv_bias, T));
    if (c.qk_norm) {
      PDS_RETURN_IF_ERROR(be.HeadRmsNorm(q, qkv_stride, L.q_norm, T, c.num_heads, eps));
      PDS_RETURN_IF_ERROR(be.HeadRmsNorm(k, qkv_stride, L.k_norm, T, c.num_kv_heads, eps));
    }
    PDS_RETURN_IF_ERROR(be.RopeWriteKv(q, k, v, qkv_stride, c.num_heads, c.num_kv_heads, c.head_dim,
                                       inv_freq_.data(), cache.k(l), cache.v(l)));
    if (on_kv_layer) PDS_RETURN_IF_ERROR(on_kv_layer(static_cast<int32_t>(l)));
    PDS_RETURN_IF_ERROR(be.Attention(q, qkv_stride, cache.k(l), cache.v(l), attn_.data(),
                                     c.num_heads, c.num_kv_heads, c.head_dim, scale));
    PDS_RETURN_IF_ERROR(be.Gemm(attn_.data(), c.q_size(), L.o, proj_.data(), T));
    if (c.o_bias) PDS_RETURN_IF_ERROR(be.AddBias(proj_.data(), c.hidden_size, L.o_bias, T));
    PDS_RETURN_IF_ERROR(be.AddRmsNorm(x_.data(), proj_.data(), L.post_norm, h_.data(), T, eps));
    // MLP block.
    PDS_RETURN_IF_ERROR(be.Gemm(h_.data(), c.hidden_size, L.gate_up, gate_up_.data(), T));
    PDS_RETURN_IF_ERROR(be.SiluGate(gate_up_.data(), act_.data(), T, c.intermediate_size));
    PDS_RETURN_IF_ERROR(be.Gemm(act_.data(), c.intermediate_size, L.down, proj_.data(), T));
    if (l + 1 < c.num_layers) {
      PDS_RETURN_IF_ERROR(
          be.AddRmsNorm(x_.data(), proj_.data(), layers_[l + 1].input_norm, h_.data(), T, eps));
    } else {
      PDS_RETURN_IF_ERROR(be.Add(x_.data(), proj_.data(), T * c.hidden_size));
    }
  }
  PDS_RETURN_IF_ERROR(be.GatherLastRows(x_.data(), last_.data(), c.hidden_size));
  return be.RmsNorm(last_.data(), final_norm_, last_.data(), B, eps);
}

}  // namespace pds::engine
