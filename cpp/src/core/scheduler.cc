#include "flashpage/scheduler.h"

#include <algorithm>
#include <string>

namespace flashpage {

// The cold state of a request; while it runs, its hot state lives in a Slot (slot >= 0) and
// num_tokens / num_computed here are stale.
struct Scheduler::Request {
  int64_t id = 0;
  RequestStatus status = RequestStatus::kWaiting;
  int32_t slot = -1;
  std::vector<int32_t> token_buf;  // prompt, then output, in [0, num_tokens); size() = capacity
  int32_t num_tokens = 0;
  int32_t num_computed = 0;
  int32_t num_prompt = 0;
  int32_t max_num_tokens = 0;
  int32_t min_stop_tokens = 0;
  std::vector<int32_t> stop_ids;  // eos (unless ignore_eos) and stop_token_ids
  uint64_t stop_bloom = 0;
  int32_t priority = 0;
  int64_t arrival = 0;
  uint64_t cache_key = 0;
  // Not a victim of priority preemption while num_output() <= this: a preempted request
  // must make progress before it can be preempted again, so requests cannot thrash.
  int32_t protect_until_output = -1;
  int64_t preempted_at_step = -1;
  BlockTable table;

  std::span<const int32_t> tokens() const { return {token_buf.data(), size_t(num_tokens)}; }
};

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "unknown";
}

void SchedulerOutput::clear() {
  // The per-row and per-token arrays are overwritten whole by every schedule(); resizing
  // them without clearing first spares zero-filling half a megabyte per step at 4k rows.
  block_table_width = 0;
  block_copies.clear();
  preempted_ids.clear();
  finished_ids.clear();
  num_prefill_tokens = 0;
  num_decode_seqs = 0;
}

namespace {

constexpr uint32_t kNeverScheduled = 0xffffffffu;
// Rows ahead whose block arrays build_output() prefetches: it streams through arrays, but
// these land at random addresses.
constexpr size_t kPrefetch = 8;

void check_config(const SchedulerConfig& c) {
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("SchedulerConfig: " + what);
  };
  if (c.max_num_seqs <= 0) fail("max_num_seqs must be positive, got " + std::to_string(c.max_num_seqs));
  if (c.max_num_batched_tokens < c.max_num_seqs)
    fail("max_num_batched_tokens (" + std::to_string(c.max_num_batched_tokens) +
         ") must be at least max_num_seqs (" + std::to_string(c.max_num_seqs) +
         ") so that every running decode fits in a step");
  if (c.max_model_len <= 0) fail("max_model_len must be positive, got " + std::to_string(c.max_model_len));
}

inline uint64_t bloom_bit(int32_t token) { return uint64_t{1} << (static_cast<uint32_t>(token) & 63); }

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_((check_config(config), config)), blocks_(config.cache) {
  slots_.reserve(config.max_num_seqs);
  scheduled_.reserve(config.max_num_seqs);
}

Scheduler::~Scheduler() = default;

// Scheduling order, for waiting requests and running slots alike: priority (lower first) under
// the priority policy, then arrival.
template <class X>
static bool ordered_before(SchedulingPolicy policy, const X& a, const X& b) {
  if (policy == SchedulingPolicy::kPriority && a.priority != b.priority)
    return a.priority < b.priority;
  return a.arrival < b.arrival;
}

bool Scheduler::before(const Request& a, const Request& b) const {
  return ordered_before(config_.policy, a, b);
}

bool Scheduler::slot_before(const Slot& a, const Slot& b) const {
  return ordered_before(config_.policy, a, b);
}

Scheduler::Request& Scheduler::get(int64_t request_id) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end())
    throw UnknownRequest("Scheduler: unknown request id " + std::to_string(request_id));
  return *it->second;
}

void Scheduler::add_request(RequestSpec spec) {
  const std::string who = "request " + std::to_string(spec.request_id) + ": ";
  if (requests_.count(spec.request_id) != 0)
    throw std::invalid_argument(who + "a request with this id is already in the scheduler");
  const StopParams& st = spec.stop;
  if (st.max_tokens < 1)
    throw std::invalid_argument(who + "max_tokens must be at least 1, got " + std::to_string(st.max_tokens));
  if (st.min_tokens < 0 || st.min_tokens > st.max_tokens)
    throw std::invalid_argument(who + "min_tokens must be in [0, max_tokens=" +
                                std::to_string(st.max_tokens) + "], got " + std::to_string(st.min_tokens));
  if (spec.priority != 0 && config_.policy != SchedulingPolicy::kPriority)
    throw std::invalid_argument(who + "priority is set but the scheduling policy is fcfs");
  const int32_t n = static_cast<int32_t>(spec.prompt.size());
  if (n == 0) throw RequestRejected(who + "the prompt is empty");
  for (int32_t t : spec.prompt)
    if (t < 0) throw std::invalid_argument(who + "negative token id " + std::to_string(t) + " in the prompt");
  if (n > config_.max_model_len)
    throw RequestRejected(who + "the prompt has " + std::to_string(n) +
                          " tokens, more than max_model_len=" + std::to_string(config_.max_model_len));
  // The last sampled token is never fed back, so its KV is never written.
  const int64_t kv_tokens = std::min<int64_t>(static_cast<int64_t>(n) + st.max_tokens - 1,
                                              std::max(n, config_.max_model_len - 1));
  const int64_t bs = blocks_.block_size();
  const int64_t need_blocks = (kv_tokens + bs - 1) / bs;
  if (need_blocks > blocks_.num_blocks())
    throw RequestRejected(who + "needs up to " + std::to_string(need_blocks) + " KV blocks (" +
                          std::to_string(kv_tokens) + " tokens) but the whole cache has " +
                          std::to_string(blocks_.num_blocks()) + " blocks of " + std::to_string(bs) +
                          " tokens; lower max_tokens or give the cache more memory");

  auto r = std::make_unique<Request>();
  r->id = spec.request_id;
  r->num_prompt = n;
  r->num_tokens = n;
  r->max_num_tokens = static_cast<int32_t>(
      std::min<int64_t>(static_cast<int64_t>(n) + st.max_tokens, config_.max_model_len));
  // Room for the whole output when it is short; longer outputs grow the buffer in update().
  const int64_t capacity = std::max<int64_t>(n + 1, std::min<int64_t>(r->max_num_tokens, n + 256));
  r->token_buf.resize(capacity);
  std::copy(spec.prompt.begin(), spec.prompt.end(), r->token_buf.begin());
  if (!st.ignore_eos) r->stop_ids = st.eos_token_ids;
  r->stop_ids.insert(r->stop_ids.end(), st.stop_token_ids.begin(), st.stop_token_ids.end());
  for (int32_t t : r->stop_ids) r->stop_bloom |= bloom_bit(t);
  r->min_stop_tokens = n + st.min_tokens;
  r->priority = spec.priority;
  r->cache_key = spec.cache_key;
  r->arrival = arrival_counter_++;
  r->table.reserve(static_cast<int32_t>(need_blocks));
  Request* raw = r.get();
  requests_.emplace(raw->id, std::move(r));
  insert_waiting(raw);
}

void Scheduler::insert_waiting(Request* r) {
  r->status = RequestStatus::kWaiting;
  if (waiting_.empty() || !before(*r, *waiting_.back())) {
    waiting_.push_back(r);
    return;
  }
  auto it = std::upper_bound(waiting_.begin(), waiting_.end(), r,
                             [this](const Request* a, const Request* b) { return before(*a, *b); });
  waiting_.insert(it, r);
}

void Scheduler::make_slot(Request& r) {
  r.status = RequestStatus::kRunning;
  r.slot = static_cast<int32_t>(slots_.size());
  Slot sl{};
  sl.req = &r;
  sl.tokens = r.token_buf.data();
  sl.id = r.id;
  sl.arrival = r.arrival;
  sl.stop_bloom = r.stop_bloom;
  sl.num_computed = r.num_computed;
  sl.num_tokens = r.num_tokens;
  sl.num_flushed = r.num_tokens;
  sl.capacity = static_cast<int32_t>(r.token_buf.size());
  sl.max_num_tokens = r.max_num_tokens;
  sl.min_stop_tokens = r.min_stop_tokens;
  sl.priority = r.priority;
  sl.last_token = r.token_buf[r.num_tokens - 1];
  sl.sched_step = kNeverScheduled;
  sl.sched_idx = -1;
  slots_.push_back(sl);
  refresh_blocks(slots_.back());
  ++num_active_running_;
}

// After the block manager changed the table: its array may have moved.
void Scheduler::refresh_blocks(Slot& sl) {
  const BlockTable& t = sl.req->table;
  sl.blocks = t.blocks().data();
  sl.num_blocks = t.num_blocks();
  sl.cached_tokens = t.num_cached_tokens();
  sl.may_share_tail = t.may_share_tail();
}

void Scheduler::add_scheduled(int32_t slot, int32_t num_new) {
  Slot& sl = slots_[slot];
  // build_output() reads the token buffer for every row but decodes (which carry last_token).
  if (!(num_new == 1 && sl.num_computed + 1 == sl.num_tokens)) flush_tokens(sl);
  sl.sched_step = step_id_;
  sl.sched_idx = static_cast<int32_t>(scheduled_.size());
  scheduled_.push_back({slot, num_new, -1, sl.num_computed, sl.num_tokens, sl.num_blocks,
                        sl.last_token, sl.id, sl.tokens, sl.blocks});
  budget_tokens_ -= num_new;
  --budget_seqs_;
}

void Scheduler::preempt(int32_t slot, SchedulerOutput& out) {
  Slot& sl = slots_[slot];
  Request& r = *sl.req;
  flush_tokens(sl);
  if (sl.sched_step == step_id_) {  // scheduled earlier in this step: give its budget back
    Scheduled& s = scheduled_[sl.sched_idx];
    budget_tokens_ += s.num_new;
    ++budget_seqs_;
    s.num_new = 0;
  }
  r.num_tokens = sl.num_tokens;
  r.num_computed = 0;  // recompute: prompt and output so far are prefilled again
  r.slot = -1;
  sl.req = nullptr;
  ++num_dead_slots_;
  --num_active_running_;
  blocks_.free(r.table);
  r.protect_until_output = r.num_tokens - r.num_prompt;
  r.preempted_at_step = num_steps_;
  insert_waiting(&r);
  out.preempted_ids.push_back(r.id);
  ++num_preemptions_;
}

int32_t Scheduler::lowest_priority_slot() const {
  int32_t worst = -1;
  for (int32_t s = 0; s < static_cast<int32_t>(slots_.size()); ++s) {
    if (slots_[s].req == nullptr) continue;
    if (worst < 0 || slot_before(slots_[worst], slots_[s])) worst = s;
  }
  return worst;
}

// Makes room for `num_new` tokens of a running slot, preempting the lowest-priority running
// requests (possibly this one) while blocks are short. The highest-priority request always
// keeps its blocks, so something always progresses. Returns false if the slot was preempted.
bool Scheduler::allocate(int32_t slot, int32_t num_new, SchedulerOutput& out) {
  Slot& sl = slots_[slot];
  const int32_t bs = blocks_.block_size();
  if (!sl.may_share_tail && sl.num_computed + num_new <= sl.num_blocks * bs) return true;
  while (!blocks_.allocate_slots(sl.req->table, sl.num_computed, num_new)) {
    const int32_t victim = lowest_priority_slot();
    preempt(victim, out);
    preempted_this_step_ = true;
    if (victim == slot) return false;
  }
  refresh_blocks(sl);
  return true;
}

void Scheduler::schedule_decodes(SchedulerOutput& out) {
  // One pass over all slots: decodes are scheduled, rows with more tokens to compute
  // (prefill chunks, recomputes) are set aside for the prefill pass.
  prefilling_.clear();
  const int32_t count = static_cast<int32_t>(slots_.size());
  for (int32_t s = 0; s < count; ++s) {
    Slot& sl = slots_[s];
    if (sl.req == nullptr || sl.sched_step == step_id_) continue;
    if (sl.num_tokens - sl.num_computed != 1) {
      prefilling_.push_back(s);
      continue;
    }
    if (budget_tokens_ <= 0 || budget_seqs_ <= 0) continue;
    if (allocate(s, 1, out)) add_scheduled(s, 1);
  }
}

void Scheduler::schedule_prefills(SchedulerOutput& out) {
  // Chunks share what is left of the token budget, in scheduling order.
  std::sort(prefilling_.begin(), prefilling_.end(),
            [this](int32_t a, int32_t b) { return slot_before(slots_[a], slots_[b]); });
  for (int32_t s : prefilling_) {
    if (budget_tokens_ <= 0 || budget_seqs_ <= 0) return;
    const Slot& sl = slots_[s];
    if (sl.req == nullptr) continue;  // preempted by an earlier chunk of this pass
    const int32_t n = std::min(sl.num_tokens - sl.num_computed, budget_tokens_);
    if (allocate(s, n, out)) add_scheduled(s, n);
  }
}

bool Scheduler::preempt_for(const Request& w, int32_t blocks_short, bool needs_seq_slot,
                            SchedulerOutput& out) {
  if (config_.policy != SchedulingPolicy::kPriority) return false;
  victims_.clear();
  for (int32_t s = 0; s < static_cast<int32_t>(slots_.size()); ++s) {
    const Slot& sl = slots_[s];
    if (sl.req == nullptr || sl.priority <= w.priority) continue;
    if (sl.num_tokens - sl.req->num_prompt <= sl.req->protect_until_output) continue;
    victims_.push_back(s);
  }
  // Lowest priority first.
  std::sort(victims_.begin(), victims_.end(),
            [this](int32_t a, int32_t b) { return slot_before(slots_[b], slots_[a]); });
  int32_t freeable = 0;
  size_t take = 0;
  while (take < victims_.size() && (freeable < blocks_short || (needs_seq_slot && take == 0))) {
    for (int32_t b : slots_[victims_[take]].req->table.blocks())
      if (blocks_.ref_count(b) == 1) ++freeable;
    ++take;
  }
  if (freeable < blocks_short || (needs_seq_slot && take == 0)) return false;
  for (size_t i = 0; i < take; ++i) preempt(victims_[i], out);
  return true;
}

void Scheduler::admit_waiting(SchedulerOutput& out) {
  const bool by_priority = config_.policy == SchedulingPolicy::kPriority;
  while (!waiting_.empty() && budget_tokens_ > 0) {
    Request& w = *waiting_.front();
    if (w.preempted_at_step == num_steps_) break;  // not back in the step that preempted it
    if (num_active_running_ >= config_.max_num_seqs) {
      if (!by_priority || !preempt_for(w, 0, true, out)) break;
    }
    if (budget_seqs_ <= 0) break;  // forks can hold more running requests than step rows
    const int32_t num_tokens = w.num_tokens;
    const int32_t hit = blocks_.allocate_prefix(w.table, w.tokens(), w.cache_key);
    const int32_t n = std::min(num_tokens - hit, budget_tokens_);
    if (!blocks_.allocate_slots(w.table, hit, n)) {
      const int32_t short_by = blocks_.blocks_needed(w.table, hit, n) - blocks_.num_free_blocks();
      if (!by_priority || !preempt_for(w, short_by, false, out) ||
          !blocks_.allocate_slots(w.table, hit, n)) {
        blocks_.rollback_prefix(w.table, num_tokens, hit);
        break;  // head-of-line: later requests wait their turn too (no starvation)
      }
    }
    waiting_.pop_front();
    w.num_computed = hit;
    make_slot(w);
    add_scheduled(w.slot, n);
  }
}

std::shared_ptr<SchedulerOutput> Scheduler::fresh_output() {
  last_output_.reset();
  for (auto& o : outputs_) {
    if (!o) o = std::make_shared<SchedulerOutput>();
    if (o.use_count() == 1) return o;
  }
  outputs_[0] = std::make_shared<SchedulerOutput>();  // both still held by callers: leave them be
  return outputs_[0];
}

// Swap-removes dead slots. Runs only at the start of schedule(): between schedule() and
// update() slot indices stay put, so rows and forks can refer to them.
void Scheduler::compact() {
  retired_.clear();
  if (num_dead_slots_ == 0) return;
  for (size_t s = 0; s < slots_.size();) {
    if (slots_[s].req != nullptr) {
      ++s;
      continue;
    }
    slots_[s] = slots_.back();
    slots_.pop_back();
    if (s < slots_.size() && slots_[s].req != nullptr) slots_[s].req->slot = static_cast<int32_t>(s);
  }
  num_dead_slots_ = 0;
}

std::shared_ptr<const SchedulerOutput> Scheduler::schedule() {
  if (awaiting_update_)
    throw std::logic_error("Scheduler::schedule: update() has not been called for the previous step");
  compact();
  step_id_ = static_cast<uint32_t>(num_steps_ & 0x7fffffff);
  std::shared_ptr<SchedulerOutput> out = fresh_output();
  out->clear();
  scheduled_.clear();
  budget_tokens_ = config_.max_num_batched_tokens;
  budget_seqs_ = config_.max_num_seqs;
  preempted_this_step_ = false;

  schedule_decodes(*out);
  schedule_prefills(*out);
  if (!preempted_this_step_) admit_waiting(*out);
  build_output(*out);
  ++num_steps_;
  awaiting_update_ = !row_slots_.empty();
  last_output_ = out;
  return out;
}

void Scheduler::build_output(SchedulerOutput& out) {
  row_slots_.clear();
  int32_t width = 0, num_tokens = 0;
  for (Scheduled& s : scheduled_) {
    if (s.num_new == 0) continue;
    s.row = static_cast<int32_t>(row_slots_.size());
    row_slots_.push_back(s.slot);
    width = std::max(width, s.num_blocks);
    num_tokens += s.num_new;
  }
  const size_t nseq = row_slots_.size();
  out.request_ids.resize(nseq);
  out.query_start_loc.resize(nseq + 1);
  out.num_computed.resize(nseq);
  out.context_lens.resize(nseq);
  out.do_sample.resize(nseq);
  out.logits_indices.resize(nseq);
  out.token_ids.resize(num_tokens);
  out.positions.resize(num_tokens);
  out.slot_mapping.resize(num_tokens);
  out.block_table_width = width;
  out.block_tables.resize(nseq * static_cast<size_t>(width));

  // Reads scheduled_ (sequential) and each row's block array; a decode's input token comes
  // with the row, so token arrays are read only for prefill chunks.
  const int32_t bs = blocks_.block_size();
  int32_t t = 0, i = 0;
  out.query_start_loc[0] = 0;
  for (size_t k = 0; k < scheduled_.size(); ++k) {
    if (k + kPrefetch < scheduled_.size()) {  // both ends of a later row's block table
      const Scheduled& ahead = scheduled_[k + kPrefetch];
      __builtin_prefetch(ahead.blocks);
      __builtin_prefetch(ahead.blocks + ahead.num_blocks - 1);
    }
    const Scheduled& s = scheduled_[k];
    if (s.num_new == 0) continue;
    const int32_t n = s.num_new;
    const int32_t start = s.num_computed;
    out.request_ids[i] = s.id;
    out.num_computed[i] = start;
    out.context_lens[i] = start + n;
    out.do_sample[i] = start + n == s.num_tokens;
    out.logits_indices[i] = t + n - 1;
    if (n == 1 && start + 1 == s.num_tokens) {
      out.token_ids[t] = s.last_token;
    } else {
      std::copy(s.tokens + start, s.tokens + start + n, out.token_ids.begin() + t);
    }
    for (int32_t j = 0; j < n; ++j) {
      const int32_t pos = start + j;
      out.positions[t + j] = pos;
      out.slot_mapping[t + j] = s.blocks[pos / bs] * bs + pos % bs;
    }
    const auto row_begin = out.block_tables.begin() + static_cast<size_t>(i) * width;
    std::fill(std::copy(s.blocks, s.blocks + s.num_blocks, row_begin), row_begin + width, -1);
    if (n == 1 && out.do_sample[i]) {
      ++out.num_decode_seqs;
    } else {
      out.num_prefill_tokens += n;
    }
    t += n;
    out.query_start_loc[++i] = t;
  }
  const auto& copies = blocks_.pending_copies();
  out.block_copies.assign(copies.begin(), copies.end());
  blocks_.clear_copies();
  out.finished_ids.swap(finished_since_step_);
  finished_since_step_.clear();
}

void Scheduler::flush_tokens(Slot& sl) {
  const int32_t pending = sl.num_tokens - sl.num_flushed;
  if (pending == 0) return;
  if (sl.num_tokens > sl.capacity) {  // outputs longer than the first reservation
    std::vector<int32_t>& buf = sl.req->token_buf;
    buf.resize(std::max<size_t>(buf.size() * 2, static_cast<size_t>(sl.num_tokens) + kTail));
    sl.tokens = buf.data();
    sl.capacity = static_cast<int32_t>(buf.size());
  }
  std::copy(sl.tail, sl.tail + pending, sl.tokens + sl.num_flushed);
  sl.num_flushed = sl.num_tokens;
}

FinishReason Scheduler::append_token(Slot& sl, int32_t token) {
  if (sl.num_tokens - sl.num_flushed == kTail) flush_tokens(sl);
  sl.tail[sl.num_tokens - sl.num_flushed] = token;
  ++sl.num_tokens;
  sl.last_token = token;
  if ((sl.stop_bloom & bloom_bit(token)) != 0 && sl.num_tokens >= sl.min_stop_tokens) {
    const auto& ids = sl.req->stop_ids;
    if (std::find(ids.begin(), ids.end(), token) != ids.end()) return FinishReason::kStop;
  }
  if (sl.num_tokens >= sl.max_num_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

const std::vector<RequestUpdate>& Scheduler::update(std::span<const int32_t> sampled,
                                                    std::span<const int32_t> fork_tokens) {
  if (!awaiting_update_) {
    if (sampled.empty() && fork_tokens.empty()) {  // after a step with no rows: nothing to do
      updates_.clear();
      return updates_;
    }
    throw std::logic_error("Scheduler::update: no step is waiting for tokens");
  }
  if (sampled.size() != row_slots_.size())
    throw std::invalid_argument("Scheduler::update: got " + std::to_string(sampled.size()) +
                                " sampled tokens for a step of " + std::to_string(row_slots_.size()) +
                                " sequences");
  if (fork_tokens.size() != forks_.size())
    throw std::invalid_argument("Scheduler::update: got " + std::to_string(fork_tokens.size()) +
                                " fork tokens for " + std::to_string(forks_.size()) + " forks");
  const SchedulerOutput& out = *last_output_;
  for (size_t i = 0; i < row_slots_.size(); ++i)
    if (row_slots_[i] >= 0 && out.do_sample[i] && sampled[i] < 0)
      throw std::invalid_argument("Scheduler::update: negative token id " +
                                  std::to_string(sampled[i]) + " for request " +
                                  std::to_string(out.request_ids[i]));
  for (int32_t t : fork_tokens)
    if (t < 0) throw std::invalid_argument("Scheduler::update: negative fork token id " + std::to_string(t));

  updates_.clear();
  fill_slots_.clear();
  finishing_.clear();
  const int32_t bs = blocks_.block_size();
  auto advance = [&](int32_t slot, int32_t num_new) {
    Slot& sl = slots_[slot];
    sl.num_computed += num_new;
    // A block filled up: offer it to the prefix cache (in one batch, below).
    if (sl.num_computed >= sl.cached_tokens + bs) fill_slots_.push_back(slot);
  };
  auto emit = [&](int32_t slot, int32_t token) {
    Slot& sl = slots_[slot];
    const FinishReason f = append_token(sl, token);
    updates_.push_back({sl.id, token, f});
    if (f != FinishReason::kNone) finishing_.push_back(sl.req);
  };
  for (size_t i = 0; i < row_slots_.size(); ++i) {
    if (row_slots_[i] < 0) continue;  // aborted after schedule()
    advance(row_slots_[i], out.query_start_loc[i + 1] - out.query_start_loc[i]);
    if (out.do_sample[i]) emit(row_slots_[i], sampled[i]);  // else: a chunk that is not the last
  }
  for (size_t k = 0; k < forks_.size(); ++k) {
    if (forks_[k] < 0) continue;
    advance(forks_[k], 0);
    emit(forks_[k], fork_tokens[k]);
  }
  // Cache before releasing, so finished requests leave their full blocks reusable.
  if (!fill_slots_.empty()) {
    cache_updates_.clear();
    for (int32_t s : fill_slots_) {
      Slot& sl = slots_[s];
      flush_tokens(sl);  // hashing reads the block's tokens
      cache_updates_.push_back({&sl.req->table, {sl.tokens, size_t(sl.num_tokens)}, sl.num_computed});
    }
    blocks_.cache_blocks_batch(cache_updates_);
    for (int32_t s : fill_slots_) slots_[s].cached_tokens = slots_[s].req->table.num_cached_tokens();
  }
  for (Request* r : finishing_) release(*r);
  row_slots_.clear();
  forks_.clear();
  awaiting_update_ = false;
  return updates_;
}

int32_t Scheduler::row_of(const Request& r) const {
  if (!awaiting_update_ || r.slot < 0) return -1;
  const Slot& sl = slots_[r.slot];
  if (sl.sched_step != step_id_) return -1;
  const Scheduled& s = scheduled_[sl.sched_idx];
  return s.num_new > 0 ? s.row : -1;
}

void Scheduler::fork_request(int64_t parent_id, int64_t child_id) {
  if (!awaiting_update_)
    throw std::logic_error("Scheduler::fork_request: call it between schedule() and update()");
  if (requests_.count(child_id) != 0)
    throw std::invalid_argument("Scheduler::fork_request: request id " + std::to_string(child_id) +
                                " is already in the scheduler");
  Request& p = get(parent_id);
  const int32_t row = row_of(p);
  if (row < 0 || !last_output_->do_sample[row])
    throw std::logic_error("Scheduler::fork_request: request " + std::to_string(parent_id) +
                           " does not sample a token in this step");
  Slot& ps = slots_[p.slot];
  flush_tokens(ps);
  auto c = std::make_unique<Request>();
  c->id = child_id;
  c->token_buf.assign(ps.tokens, ps.tokens + ps.capacity);
  c->num_tokens = ps.num_tokens;
  c->num_computed = last_output_->context_lens[row];  // as the parent after this step
  c->num_prompt = p.num_prompt;
  c->max_num_tokens = p.max_num_tokens;
  c->min_stop_tokens = p.min_stop_tokens;
  c->stop_ids = p.stop_ids;
  c->stop_bloom = p.stop_bloom;
  c->priority = p.priority;
  c->cache_key = p.cache_key;
  c->arrival = arrival_counter_++;
  blocks_.fork(p.table, c->table);
  ps.may_share_tail = true;  // the parent's next write may need a copy too
  Request* raw = c.get();
  requests_.emplace(child_id, std::move(c));
  make_slot(*raw);  // may move slots_: no Slot references past this point
  forks_.push_back(raw->slot);
}

void Scheduler::release(Request& r) {
  if (r.slot >= 0) {
    Slot& sl = slots_[r.slot];
    flush_tokens(sl);
    r.num_tokens = sl.num_tokens;
    r.num_computed = sl.num_computed;
    if (const int32_t row = row_of(r); row >= 0) row_slots_[row] = -1;
    std::replace(forks_.begin(), forks_.end(), r.slot, -1);
    sl.req = nullptr;
    ++num_dead_slots_;
    --num_active_running_;
    r.slot = -1;
  } else if (r.status == RequestStatus::kWaiting) {
    auto it = std::find(waiting_.begin(), waiting_.end(), &r);
    if (it != waiting_.end()) waiting_.erase(it);
  }
  blocks_.free(r.table);
  r.status = RequestStatus::kFinished;
  finished_since_step_.push_back(r.id);
  auto it = requests_.find(r.id);
  retired_.push_back(std::move(it->second));
  requests_.erase(it);
}

bool Scheduler::abort_request(int64_t request_id) {
  return finish_request(request_id, FinishReason::kAbort);
}

bool Scheduler::finish_request(int64_t request_id, FinishReason reason) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return false;
  if (reason == FinishReason::kNone)
    throw std::invalid_argument("Scheduler::finish_request: a finish reason is required");
  release(*it->second);
  return true;
}

RequestStatus Scheduler::status(int64_t request_id) const { return get(request_id).status; }

std::span<const int32_t> Scheduler::tokens(int64_t request_id) {
  const Request& r = get(request_id);
  if (r.slot < 0) return r.tokens();
  Slot& sl = slots_[r.slot];
  flush_tokens(sl);
  return {sl.tokens, static_cast<size_t>(sl.num_tokens)};
}

int32_t Scheduler::num_prompt_tokens(int64_t request_id) const { return get(request_id).num_prompt; }

int32_t Scheduler::num_computed_tokens(int64_t request_id) const {
  const Request& r = get(request_id);
  return r.slot < 0 ? r.num_computed : slots_[r.slot].num_computed;
}

std::span<const int32_t> Scheduler::block_table(int64_t request_id) const {
  return get(request_id).table.blocks();
}

std::vector<int64_t> Scheduler::running_ids() const {
  std::vector<int64_t> ids;
  for (const Slot& sl : slots_)
    if (sl.req != nullptr) ids.push_back(sl.id);
  return ids;
}

std::vector<int64_t> Scheduler::waiting_ids() const {
  std::vector<int64_t> ids;
  for (const Request* r : waiting_) ids.push_back(r->id);
  return ids;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  s.num_waiting = num_waiting();
  s.num_running = num_active_running_;
  s.num_preemptions = num_preemptions_;
  s.num_steps = num_steps_;
  s.cache = blocks_.stats();
  const int64_t bs = blocks_.block_size();
  for (const Slot& sl : slots_) {
    if (sl.req == nullptr) continue;
    s.cache.waste_tokens += std::max<int64_t>(0, int64_t(sl.num_blocks) * bs - sl.num_tokens);
  }
  return s;
}

}  // namespace flashpage
