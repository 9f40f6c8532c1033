#include "client/bench_runner.h"

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"

namespace pds::client {
namespace {

using pdserve::v1::GenerateRequest;
using pdserve::v1::GenerateResponse;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct Slot {
  RequestRecord record;
  std::string finish_reason;
  double last_message_s = -1;
  bool finished = false;
  // Multi-turn runs: the prompt sent and the tokens answered.
  std::vector<int32_t> prompt_ids, output_ids;
};

// A multi-turn conversation (guarded by RunState::mu).
struct Conversation {
  std::vector<int32_t> context;  // the last turn's prompt and its answer
  int32_t next_turn = 0;
  double due_s = 0;      // when the next turn is due
  bool waiting = false;  // a turn is in flight
  bool ended = false;
};

// Shared with the calls' callbacks, which may (after a failed drain) outlive the run loop.
struct RunState {
  std::mutex mu;
  std::condition_variable cv;
  Clock::time_point t0;
  std::vector<std::unique_ptr<Slot>> slots;
  std::map<int64_t, std::shared_ptr<GenerateCall>> live;
  int64_t inflight = 0;
  int64_t finished = 0;
  int64_t failed = 0;
  bool contacted = false;
  // Multi-turn runs.
  std::vector<Conversation> conversations;
  int turns = 1;
  double think_time_s = 0;
};

void OnMessage(RunState& st, Slot& slot, const GenerateResponse& msg, Clock::time_point t) {
  std::lock_guard<std::mutex> lock(st.mu);
  st.contacted = true;
  if (slot.finished) return;
  const double at = Seconds(t - st.t0);
  slot.last_message_s = at;
  if (msg.token_ids_size() > 0) {
    slot.record.chunk_times_s.push_back(at);
    slot.record.chunk_tokens.push_back(msg.token_ids_size());
    if (slot.record.conversation >= 0) {
      slot.output_ids.insert(slot.output_ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    }
  }
  if (msg.has_done()) {
    const auto& done = msg.done();
    slot.finish_reason = done.finish_reason();
    if (done.prompt_tokens() > 0) slot.record.prompt_tokens = done.prompt_tokens();
    slot.record.cached_prompt_tokens = done.cached_prompt_tokens();
    if (done.has_timeline()) {
      const auto& tl = done.timeline();
      ServerTimeline& out = slot.record.timeline;
      slot.record.has_timeline = true;
      out.arrival_us = tl.arrival_us();
      out.queued_us = tl.queued_us();
      out.prefill_start_us = tl.prefill_start_us();
      out.prefill_end_us = tl.prefill_end_us();
      out.kv_transfer_start_us = tl.kv_transfer_start_us();
      out.kv_transfer_end_us = tl.kv_transfer_end_us();
      out.first_token_us = tl.first_token_us();
      out.decode_start_us = tl.decode_start_us();
      out.finish_us = tl.finish_us();
      out.prefill_instance = tl.prefill_instance();
      out.decode_instance = tl.decode_instance();
    }
  }
}

void Fail(Slot& slot, std::string code, std::string message) {
  slot.record.ok = false;
  slot.record.error_code = std::move(code);
  slot.record.error_message = std::move(message);
}

void OnDone(RunState& st, Slot& slot, const grpc::Status& status, Clock::time_point t) {
  std::lock_guard<std::mutex> lock(st.mu);
  const int64_t index = slot.record.index;
  if (!slot.finished) {
    slot.finished = true;
    RequestRecord& r = slot.record;
    const auto code = static_cast<absl::StatusCode>(status.error_code());
    if (code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kDeadlineExceeded &&
        code != absl::StatusCode::kCancelled) {
      st.contacted = true;
    }
    if (!status.ok()) {
      Fail(slot, absl::StatusCodeToString(code), status.error_message());
    } else if (slot.finish_reason == "error") {
      Fail(slot, "FINISH_ERROR", "the server finished the request with an error");
    } else if (slot.finish_reason == "cancelled") {
      Fail(slot, "FINISH_CANCELLED", "the server cancelled the request");
    } else if (r.chunk_times_s.empty()) {
      Fail(slot, "EMPTY_STREAM", "the stream ended without tokens");
    } else if (slot.finish_reason.empty()) {
      // The last message carries Done: a stream without one was cut short.
      Fail(slot, "NO_DONE", "the stream ended OK without its final (done) message");
    } else {
      r.ok = true;
    }
    r.end_s = r.ok ? slot.last_message_s : Seconds(t - st.t0);
    --st.inflight;
    ++st.finished;
    if (!r.ok) ++st.failed;
    if (r.conversation >= 0) {
      // The next turn follows the answer after the think time; a failed turn ends it.
      Conversation& c = st.conversations[r.conversation];
      c.waiting = false;
      c.next_turn = r.turn + 1;
      c.due_s = r.end_s + st.think_time_s;
      c.ended = !r.ok || c.next_turn >= st.turns;
      if (!c.ended) {
        c.context = std::move(slot.prompt_ids);
        c.context.insert(c.context.end(), slot.output_ids.begin(), slot.output_ids.end());
      }
    }
  }
  st.live.erase(index);
  st.cv.notify_all();
}

}  // namespace

GenerateRequest MakeGenerateRequest(const RequestSpec& spec, int64_t index,
                                    const RunOptions& options, double lag_s) {
  GenerateRequest req;
  if (!options.request_id_prefix.empty()) {
    req.set_request_id(absl::StrCat(options.request_id_prefix, "-", index));
  }
  if (spec.use_text) {
    req.set_prompt_text(spec.prompt_text);
  } else {
    req.mutable_prompt_token_ids()->Add(spec.prompt_token_ids.begin(), spec.prompt_token_ids.end());
  }
  req.set_max_tokens(static_cast<int32_t>(std::max<int64_t>(spec.output_len, 1)));
  req.set_ignore_eos(true);
  if (options.temperature) req.set_temperature(*options.temperature);
  req.set_json_schema(options.json_schema);
  req.set_regex(options.regex);
  if (options.send_slo) {
    if (options.slo.ttft_ms > 0) {
      req.set_ttft_slo_ms(std::max(options.slo.ttft_ms - 1000 * std::max(lag_s, 0.0), 1e-3));
    } else if (options.slo.ttft_ms == 0) {
      req.set_ttft_slo_ms(0);  // the server's "no target"
    }
    if (options.slo.tpot_ms >= 0) req.set_tpot_slo_ms(options.slo.tpot_ms);
  }
  return req;
}

absl::StatusOr<RunResult> RunBenchmark(GenerateClient& client,
                                       const std::vector<RequestSpec>& specs,
                                       const RunOptions& options) {
  const bool closed = options.concurrency > 0;
  if (specs.empty()) return absl::InvalidArgumentError("no requests to send");
  const bool multi_turn = options.turns > 1;
  if (multi_turn && (closed || options.burst || options.turns > 1000 ||
                     !(options.think_time_s >= 0) || options.follow_up_skip < 0)) {
    return absl::InvalidArgumentError(
        "multi-turn runs are open loop at a finite rate, with 2..1000 turns, a think time >= 0 "
        "and follow_up_skip >= 0");
  }
  if (!closed && options.max_inflight < 1) {
    return absl::InvalidArgumentError("the in-flight bound must be >= 1");
  }
  int64_t total = options.max_requests;
  if (total < 0)
    total =
        closed ? static_cast<int64_t>(specs.size()) : static_cast<int64_t>(options.arrivals.size());
  if (!closed) total = std::min<int64_t>(total, static_cast<int64_t>(options.arrivals.size()));
  // Multi-turn: `total` conversations of up to `turns` requests each.
  if (multi_turn) {
    total = std::min<int64_t>(total, static_cast<int64_t>(specs.size()) / options.turns);
    if (total < 1) return absl::InvalidArgumentError("fewer specs than turns of one conversation");
  }
  const int64_t limit = closed ? options.concurrency : options.max_inflight;
  const absl::Duration timeout = absl::Seconds(options.request_timeout_s);
  const double interval = std::max(options.progress_interval_s, 0.01);

  auto st = std::make_shared<RunState>();
  st->t0 = Clock::now();
  st->turns = options.turns;
  st->think_time_s = options.think_time_s;
  if (multi_turn) st->conversations.resize(total);
  auto elapsed = [&] { return Seconds(Clock::now() - st->t0); };
  auto at = [&](double s) {
    return st->t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  };
  RunResult result;
  double next_progress = 0;
  auto progress_locked = [&](double now_s) {
    RunProgress p;
    p.total = multi_turn ? total * options.turns : total;
    p.sent = static_cast<int64_t>(st->slots.size());
    p.finished = st->finished;
    p.failed = st->failed;
    p.inflight = st->inflight;
    p.elapsed_s = now_s;
    return p;
  };
  // Reports progress when due; called with the lock held, releases it around the callback.
  auto maybe_report = [&](std::unique_lock<std::mutex>& lock, double now_s, bool force) {
    if (!options.progress || (!force && now_s < next_progress)) return;
    next_progress = now_s + interval;
    RunProgress p = progress_locked(now_s);
    lock.unlock();
    options.progress(p);
    lock.lock();
  };

  std::vector<RequestRecord> unsent;
  // Sends `spec` as request `index` (the lock held on entry and on return).
  auto send = [&](std::unique_lock<std::mutex>& lock, const RequestSpec& spec, int64_t index,
                  double lag_s, Slot* slot) {
    ++st->inflight;
    lock.unlock();
    GenerateCallbacks callbacks;
    callbacks.on_message = [st, slot](const GenerateResponse& msg, Clock::time_point t) {
      OnMessage(*st, *slot, msg, t);
    };
    callbacks.on_done = [st, slot](const grpc::Status& s, Clock::time_point t) {
      OnDone(*st, *slot, s, t);
    };
    auto call = client.StartGenerate(MakeGenerateRequest(spec, index, options, lag_s), timeout,
                                     std::move(callbacks));
    lock.lock();
    if (!slot->finished) st->live[index] = std::move(call);
  };
  auto new_slot = [&](const RequestSpec& spec, int64_t index, double scheduled_s, double send_s) {
    st->slots.push_back(std::make_unique<Slot>());
    Slot* slot = st->slots.back().get();
    slot->record.index = index;
    slot->record.prompt_tokens = spec.prompt_len;
    slot->record.expected_output_tokens = spec.output_len;
    slot->record.scheduled_s = scheduled_s;
    slot->record.send_s = send_s;
    return slot;
  };

  if (multi_turn) {
    // Turn `turn` of conversation `c` (the lock held): its history, then its own message; none
    // when it would pass max_model_len, or for a text prompt (it cannot carry the answer's
    // tokens): the conversation ends there.
    const auto turn_spec = [&](int64_t c, int32_t turn) -> std::optional<RequestSpec> {
      const RequestSpec& base = specs[c * options.turns + turn];
      if (base.use_text) return std::nullopt;
      RequestSpec spec;
      spec.output_len = base.output_len;
      spec.prompt_token_ids = st->conversations[c].context;
      const size_t skip = turn == 0 ? 0
                                    : std::min(base.prompt_token_ids.size(),
                                               static_cast<size_t>(options.follow_up_skip));
      spec.prompt_token_ids.insert(spec.prompt_token_ids.end(),
                                   base.prompt_token_ids.begin() + skip,
                                   base.prompt_token_ids.end());
      spec.prompt_len = static_cast<int64_t>(spec.prompt_token_ids.size());
      if (options.max_model_len > 0 && spec.prompt_len + spec.output_len > options.max_model_len) {
        return std::nullopt;
      }
      return spec;
    };
    // The earliest due turn: a conversation's next one or the next conversation's first.
    std::unique_lock<std::mutex> lock(st->mu);
    int64_t next_start = 0;
    while (true) {
      double now_s = elapsed();
      maybe_report(lock, now_s, false);
      now_s = elapsed();
      if (options.duration_s > 0 && now_s >= options.duration_s) {
        // Turns due before the end but never sent (the in-flight bound held them) count as
        // failed, as in a single-turn run.
        const auto not_sent = [&](int64_t c, int32_t turn, double due_s) {
          // A turn past the context cap would have ended its conversation instead.
          const std::optional<RequestSpec> spec = turn_spec(c, turn);
          if (!spec) return;
          RequestRecord r;
          r.index = static_cast<int64_t>(st->slots.size() + unsent.size());
          r.ok = false;
          r.error_code = "NOT_SENT";
          r.error_message =
              "due before the run ended but never sent: the in-flight bound was reached";
          r.prompt_tokens = spec->prompt_len;
          r.expected_output_tokens = spec->output_len;
          r.scheduled_s = due_s;
          r.send_s = r.end_s = options.duration_s;
          r.conversation = c;
          r.turn = turn;
          unsent.push_back(std::move(r));
        };
        for (int64_t c = 0; c < total; ++c) {
          const Conversation& conv = st->conversations[c];
          if (c >= next_start && options.arrivals[c] < options.duration_s) {
            not_sent(c, 0, options.arrivals[c]);
          } else if (c < next_start && !conv.ended && !conv.waiting &&
                     conv.due_s < options.duration_s) {
            not_sent(c, conv.next_turn, conv.due_s);
          }
        }
        break;
      }
      int64_t pick = -1;
      double due = 0;
      for (int64_t c = 0; c < next_start; ++c) {
        const Conversation& conv = st->conversations[c];
        if (conv.ended || conv.waiting) continue;
        if (pick < 0 || conv.due_s < due) {
          pick = c;
          due = conv.due_s;
        }
      }
      if (next_start < total && (pick < 0 || options.arrivals[next_start] < due)) {
        pick = next_start;
        due = options.arrivals[next_start];
      }
      if (pick < 0 && st->inflight == 0) break;  // every conversation ended
      if (pick < 0 || now_s < due || st->inflight >= limit) {
        double wake = pick >= 0 && now_s < due ? due : now_s + interval;
        if (options.progress) wake = std::min(wake, next_progress);
        if (options.duration_s > 0) wake = std::min(wake, options.duration_s);
        st->cv.wait_until(lock, at(std::max(wake, now_s + 1e-4)));
        continue;
      }
      if (pick == next_start) ++next_start;
      Conversation& conv = st->conversations[pick];
      const std::optional<RequestSpec> built = turn_spec(pick, conv.next_turn);
      if (!built) {
        conv.ended = true;
        continue;
      }
      const RequestSpec& spec = *built;
      const double send_s = elapsed();
      if (send_s - due > 0.010) {
        ++result.late_sends;
        result.max_send_lag_s = std::max(result.max_send_lag_s, send_s - due);
      }
      const int64_t index = static_cast<int64_t>(st->slots.size());
      Slot* slot = new_slot(spec, index, due, send_s);
      slot->record.conversation = pick;
      slot->record.turn = conv.next_turn;
      slot->prompt_ids = spec.prompt_token_ids;
      conv.waiting = true;
      send(lock, spec, index, send_s - due, slot);
    }
  }
  for (int64_t i = 0; i < total && !multi_turn; ++i) {
    const double due = closed ? 0 : options.arrivals[i];
    if (options.duration_s > 0 && due >= options.duration_s) break;
    std::unique_lock<std::mutex> lock(st->mu);
    bool stop = false;
    for (;;) {
      double now_s = elapsed();
      maybe_report(lock, now_s, false);
      now_s = elapsed();
      if (options.duration_s > 0 && now_s >= options.duration_s) {
        stop = true;
        break;
      }
      if (now_s >= due && st->inflight < limit) break;
      double wake = now_s < due ? due : now_s + interval;
      if (options.progress) wake = std::min(wake, next_progress);
      if (options.duration_s > 0) wake = std::min(wake, options.duration_s);
      st->cv.wait_until(lock, at(std::max(wake, now_s + 1e-4)));
    }
    if (stop) {
      // The run ended while requests that were due could not be sent (the in-flight bound was
      // reached): they count as failed, or a rate the server never received would look met.
      for (int64_t j = i; j < total && !closed && options.arrivals[j] < options.duration_s; ++j) {
        RequestRecord r;
        r.index = j;
        r.ok = false;
        r.error_code = "NOT_SENT";
        r.error_message =
            "due before the run ended but never sent: the in-flight bound was reached";
        r.prompt_tokens = specs[j % specs.size()].prompt_len;
        r.expected_output_tokens = specs[j % specs.size()].output_len;
        r.scheduled_s = options.arrivals[j];
        r.send_s = r.end_s = options.duration_s;
        unsent.push_back(std::move(r));
      }
      break;
    }
    const double send_s = elapsed();
    const bool paced = !closed && !options.burst;  // latencies count from the arrival
    if (paced && send_s - due > 0.010) {
      ++result.late_sends;
      result.max_send_lag_s = std::max(result.max_send_lag_s, send_s - due);
    }
    const RequestSpec& spec = specs[i % specs.size()];
    Slot* slot = new_slot(spec, i, paced ? due : send_s, send_s);
    send(lock, spec, i, paced ? send_s - due : 0.0, slot);
  }

  // Drain: wait for the calls in flight, then cancel what is left.
  {
    std::unique_lock<std::mutex> lock(st->mu);
    const double drain =
        options.drain_timeout_s >= 0 ? options.drain_timeout_s : options.request_timeout_s + 5;
    const double drain_end = elapsed() + drain;
    while (st->inflight > 0 && elapsed() < drain_end) {
      maybe_report(lock, elapsed(), false);
      double wake = std::min(drain_end, elapsed() + interval);
      if (options.progress) wake = std::min(wake, next_progress);
      st->cv.wait_until(lock, at(std::max(wake, elapsed() + 1e-4)));
    }
    if (st->inflight > 0) {
      for (auto& [index, call] : st->live) call->Cancel();
      st->cv.wait_until(lock, at(elapsed() + 5), [&] { return st->inflight == 0; });
    }
    const double end_s = elapsed();
    for (auto& slot : st->slots) {
      if (!slot->finished) {  // a call that did not end even when cancelled
        slot->finished = true;
        Fail(*slot, "CLIENT_TIMEOUT", "the call did not end after cancellation");
        slot->record.end_s = end_s;
        ++st->finished;
        ++st->failed;
      }
      result.duration_s = std::max(result.duration_s, slot->record.end_s);
      result.records.push_back(slot->record);
    }
    for (RequestRecord& r : unsent) result.records.push_back(std::move(r));
    result.contacted = st->contacted;
    maybe_report(lock, end_s, true);
  }
  return result;
}

}  // namespace pds::client
