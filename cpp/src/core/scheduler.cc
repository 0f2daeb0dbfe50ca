#include "flashpage/scheduler.h"

#include <algorithm>
#include <string>

namespace flashpage {

// Cache-line aligned, hot fields first: every step reads them for thousands of requests, and
// they then span two lines instead of straddling three.
struct alignas(64) Scheduler::Request {
  RequestStatus status = RequestStatus::kWaiting;
  int32_t num_computed = 0;  // tokens whose KV is in the cache
  int32_t sched_idx = -1;    // index into scheduled_, valid when sched_step == step_id_
  int64_t sched_step = -1;   // the step that scheduled it last
  int32_t num_prompt = 0;
  int32_t max_num_tokens = 0;  // prompt + max_tokens, capped at max_model_len
  int32_t min_stop_tokens = 0;  // total tokens before stop ids count (prompt + min_tokens)
  int32_t num_stop_ids = 0;
  int64_t id = 0;
  std::vector<int32_t> tokens;  // prompt, then output
  BlockTable table;
  std::vector<int32_t> stop_ids;  // eos (unless ignore_eos) and stop_token_ids
  StopParams stop;
  int32_t priority = 0;
  int64_t arrival = 0;
  uint64_t cache_key = 0;
  // Not a victim of priority preemption while num_output() <= this: a preempted request
  // must make progress before it can be preempted again, so requests cannot thrash.
  int32_t protect_until_output = -1;
  int64_t preempted_at_step = -1;

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t num_output() const { return num_tokens() - num_prompt; }
};

namespace {

inline void prefetch_request(const void* r) {
  const char* p = static_cast<const char*>(r);
  __builtin_prefetch(p);
  __builtin_prefetch(p + 64);
}

}  // namespace

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "unknown";
}

void StepOutput::clear() {
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

// How far ahead loops over requests prefetch: they are pointer-chasing through thousands of
// heap objects, and the prefetch overlaps those cache misses.
// Two distances: the request object itself first, then (once it is in cache) the token and
// block arrays it points to.
constexpr size_t kPrefetchFar = 32;
constexpr size_t kPrefetchNear = 12;

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

bool has_token(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_((check_config(config), config)), blocks_(config.cache) {
  running_.reserve(config.max_num_seqs);
  scheduled_.reserve(config.max_num_seqs);
}

Scheduler::~Scheduler() = default;

bool Scheduler::before(const Request& a, const Request& b) const {
  if (config_.policy == SchedulingPolicy::kPriority && a.priority != b.priority)
    return a.priority < b.priority;
  return a.arrival < b.arrival;
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
  r->tokens = std::move(spec.prompt);
  r->tokens.reserve(std::min<int64_t>(kv_tokens + 1, config_.max_model_len + 1));
  r->num_prompt = n;
  r->stop = std::move(spec.stop);
  if (!r->stop.ignore_eos) r->stop_ids = r->stop.eos_token_ids;
  r->stop_ids.insert(r->stop_ids.end(), r->stop.stop_token_ids.begin(), r->stop.stop_token_ids.end());
  r->num_stop_ids = static_cast<int32_t>(r->stop_ids.size());
  r->min_stop_tokens = n + r->stop.min_tokens;
  r->max_num_tokens = static_cast<int32_t>(
      std::min<int64_t>(static_cast<int64_t>(n) + r->stop.max_tokens, config_.max_model_len));
  r->priority = spec.priority;
  r->cache_key = spec.cache_key;
  r->arrival = arrival_counter_++;
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

int32_t Scheduler::row_of(const Request& r) const {
  if (!awaiting_update_ || r.sched_step != step_id_) return -1;
  const Scheduled& s = scheduled_[r.sched_idx];
  return s.num_new > 0 ? s.row : -1;
}

void Scheduler::add_scheduled(Request& r, int32_t num_new) {
  r.sched_idx = static_cast<int32_t>(scheduled_.size());
  r.sched_step = step_id_;
  // Everything build_output() needs, so it does not touch the request again.
  scheduled_.push_back({&r, num_new, r.table.num_blocks(), -1, r.num_computed, r.id,
                        r.tokens.data(), r.table.blocks().data(), r.num_tokens()});
  budget_tokens_ -= num_new;
  --budget_seqs_;
}

void Scheduler::preempt(Request& r, StepOutput& out) {
  if (r.sched_step == step_id_) {  // scheduled earlier in this step: give its budget back
    Scheduled& s = scheduled_[r.sched_idx];
    budget_tokens_ += s.num_new;
    ++budget_seqs_;
    s.num_new = 0;
    r.sched_step = -1;
  }
  blocks_.free(r.table);
  r.num_computed = 0;  // recompute: prompt and output so far are prefilled again
  r.protect_until_output = r.num_output();
  r.preempted_at_step = num_steps_;
  --num_active_running_;
  insert_waiting(&r);
  out.preempted_ids.push_back(r.id);
  ++num_preemptions_;
}

void Scheduler::schedule_running(bool decodes, StepOutput& out) {
  // The decode pass walks all of running_ and sets aside the rows with more than one token
  // left (prefill chunks, recomputes) for the second pass.
  if (decodes) prefilling_.clear();
  const size_t count = decodes ? running_.size() : prefilling_.size();
  for (size_t i = 0; i < count; ++i) {
    if (decodes && i + kPrefetchFar < count) prefetch_request(running_[i + kPrefetchFar]);
    Request& r = decodes ? *running_[i] : *prefilling_[i];
    if (r.status != RequestStatus::kRunning || r.sched_step == step_id_) continue;
    const int32_t remaining = r.num_tokens() - r.num_computed;
    if (decodes && remaining != 1) {
      prefilling_.push_back(&r);
      continue;
    }
    if (budget_tokens_ <= 0 || budget_seqs_ <= 0) {
      if (decodes) continue;  // keep collecting the prefilling rows
      return;
    }
    const int32_t n = std::min(remaining, budget_tokens_);
    bool preempted_self = false;
    while (!blocks_.allocate_slots(r.table, r.num_computed, n)) {
      // Out of blocks: preempt the lowest-priority running request (possibly r itself).
      // The highest-priority request always keeps its blocks, so something always progresses.
      Request* victim = nullptr;
      for (size_t j = running_.size(); j-- > 0;) {
        if (running_[j]->status == RequestStatus::kRunning) {
          victim = running_[j];
          break;
        }
      }
      preempt(*victim, out);
      preempted_this_step_ = true;
      if (victim == &r) {
        preempted_self = true;
        break;
      }
    }
    if (!preempted_self) add_scheduled(r, n);
  }
}

bool Scheduler::preempt_for(Request& w, int32_t blocks_short, bool needs_seq_slot,
                            StepOutput& out) {
  if (config_.policy != SchedulingPolicy::kPriority) return false;
  victims_.clear();
  int32_t freeable = 0;
  bool enough = false;
  for (size_t j = running_.size(); j-- > 0;) {
    Request& c = *running_[j];
    if (c.status != RequestStatus::kRunning) continue;
    if (c.priority <= w.priority) break;  // running_ is in priority order
    if (c.num_output() <= c.protect_until_output) continue;
    victims_.push_back(&c);
    for (int32_t b : c.table.blocks())
      if (blocks_.ref_count(b) == 1) ++freeable;
    if (freeable >= blocks_short) {
      enough = true;
      break;
    }
  }
  if (!enough || (needs_seq_slot && victims_.empty())) return false;
  for (Request* v : victims_) preempt(*v, out);
  return true;
}

void Scheduler::admit_waiting(StepOutput& out) {
  const bool by_priority = config_.policy == SchedulingPolicy::kPriority;
  while (!waiting_.empty() && budget_tokens_ > 0) {
    Request& w = *waiting_.front();
    if (w.preempted_at_step == num_steps_) break;  // not back in the step that preempted it
    if (num_active_running_ >= config_.max_num_seqs) {
      if (!by_priority || !preempt_for(w, 0, true, out)) break;
    }
    if (budget_seqs_ <= 0) break;  // forks can hold more running requests than step rows
    const int32_t num_tokens = w.num_tokens();
    const int32_t hit = blocks_.allocate_prefix(w.table, w.tokens, w.cache_key);
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
    w.status = RequestStatus::kRunning;
    w.num_computed = hit;
    ++num_active_running_;
    admitted_.push_back(&w);
    add_scheduled(w, n);
  }
}

std::shared_ptr<StepOutput> Scheduler::fresh_output() {
  last_output_.reset();
  for (auto& o : outputs_) {
    if (!o) o = std::make_shared<StepOutput>();
    if (o.use_count() == 1) return o;
  }
  outputs_[0] = std::make_shared<StepOutput>();  // both still held by callers: leave them be
  return outputs_[0];
}

void Scheduler::compact() {
  if (retired_.empty()) return;  // nothing finished since the last compact()
  std::erase_if(running_, [](const Request* r) { return r->status != RequestStatus::kRunning; });
  retired_.clear();
}

std::shared_ptr<const StepOutput> Scheduler::schedule() {
  if (awaiting_update_)
    throw std::logic_error("Scheduler::schedule: update() has not been called for the previous step");
  compact();
  step_id_ = num_steps_;
  std::shared_ptr<StepOutput> out = fresh_output();
  out->clear();
  scheduled_.clear();
  admitted_.clear();
  budget_tokens_ = config_.max_num_batched_tokens;
  budget_seqs_ = config_.max_num_seqs;
  preempted_this_step_ = false;

  schedule_running(/*decodes=*/true, *out);
  schedule_running(/*decodes=*/false, *out);
  if (!preempted_this_step_) admit_waiting(*out);

  // Keep running_ in scheduling order: drop the preempted, merge in the admitted.
  std::erase_if(running_, [](const Request* r) { return r->status != RequestStatus::kRunning; });
  if (!admitted_.empty()) {
    merge_buf_.clear();
    std::merge(running_.begin(), running_.end(), admitted_.begin(), admitted_.end(),
               std::back_inserter(merge_buf_),
               [this](const Request* a, const Request* b) { return before(*a, *b); });
    running_.swap(merge_buf_);
  }
  build_output(*out);
  ++num_steps_;
  awaiting_update_ = !rows_.empty();
  last_output_ = out;
  return out;
}

void Scheduler::build_output(StepOutput& out) {
  rows_.clear();
  int32_t width = 0, num_tokens = 0;
  for (Scheduled& s : scheduled_) {
    if (s.num_new == 0) continue;
    s.row = static_cast<int32_t>(rows_.size());
    rows_.push_back(s.req);
    width = std::max(width, s.num_blocks);
    num_tokens += s.num_new;
  }
  const size_t nseq = rows_.size();
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

  // Reads only scheduled_ and the token and block arrays it points to: the requests
  // themselves are not touched again, which matters with thousands of them.
  const int32_t bs = blocks_.block_size();
  int32_t t = 0, i = 0;
  out.query_start_loc[0] = 0;
  for (size_t k = 0; k < scheduled_.size(); ++k) {
    if (k + kPrefetchNear < scheduled_.size()) {
      const Scheduled& ahead = scheduled_[k + kPrefetchNear];
      __builtin_prefetch(ahead.tokens + ahead.num_computed);
      __builtin_prefetch(ahead.blocks);
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
    std::copy(s.tokens + start, s.tokens + start + n, out.token_ids.begin() + t);
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

FinishReason Scheduler::append_token(Request& r, int32_t token) {
  r.tokens.push_back(token);
  const int32_t n = r.num_tokens();
  if (r.num_stop_ids > 0 && n >= r.min_stop_tokens && has_token(r.stop_ids, token))
    return FinishReason::kStop;
  // max_tokens, or max_model_len for a prompt that already fills it.
  if (n >= r.max_num_tokens || n >= config_.max_model_len) return FinishReason::kLength;
  return FinishReason::kNone;
}

const std::vector<RequestUpdate>& Scheduler::update(std::span<const int32_t> sampled,
                                                    std::span<const int32_t> fork_tokens) {
  if (!awaiting_update_) throw std::logic_error("Scheduler::update: no step is waiting for tokens");
  if (sampled.size() != rows_.size())
    throw std::invalid_argument("Scheduler::update: got " + std::to_string(sampled.size()) +
                                " sampled tokens for a step of " + std::to_string(rows_.size()) +
                                " sequences");
  if (fork_tokens.size() != forks_.size())
    throw std::invalid_argument("Scheduler::update: got " + std::to_string(fork_tokens.size()) +
                                " fork tokens for " + std::to_string(forks_.size()) + " forks");
  const StepOutput& out = *last_output_;
  for (size_t i = 0; i < rows_.size(); ++i)
    if (rows_[i] && out.do_sample[i] && sampled[i] < 0)
      throw std::invalid_argument("Scheduler::update: negative token id " +
                                  std::to_string(sampled[i]) + " for request " +
                                  std::to_string(rows_[i]->id));
  for (int32_t t : fork_tokens)
    if (t < 0) throw std::invalid_argument("Scheduler::update: negative fork token id " + std::to_string(t));

  updates_.clear();
  const int32_t bs = blocks_.block_size();
  for (size_t i = 0; i < rows_.size(); ++i) {
    if (i + kPrefetchFar < rows_.size() && rows_[i + kPrefetchFar])
      prefetch_request(rows_[i + kPrefetchFar]);
    if (i + kPrefetchNear < rows_.size() && rows_[i + kPrefetchNear]) {
      const Request* ahead = rows_[i + kPrefetchNear];
      __builtin_prefetch(ahead->tokens.data() + ahead->tokens.size());
    }
    Request* r = rows_[i];
    if (r == nullptr) continue;  // aborted after schedule()
    r->num_computed += out.query_start_loc[i + 1] - out.query_start_loc[i];
    if (r->num_computed >= r->table.num_cached_tokens() + bs)  // a block filled up
      blocks_.cache_blocks(r->table, r->tokens, r->num_computed);
    if (!out.do_sample[i]) continue;  // a prefill chunk that is not the last
    const FinishReason f = append_token(*r, sampled[i]);
    updates_.push_back({r->id, sampled[i], f});
    if (f != FinishReason::kNone) release(*r);
  }
  for (size_t k = 0; k < forks_.size(); ++k) {
    Request* c = forks_[k];
    if (c == nullptr) continue;
    blocks_.cache_blocks(c->table, c->tokens, c->num_computed);
    const FinishReason f = append_token(*c, fork_tokens[k]);
    updates_.push_back({c->id, fork_tokens[k], f});
    if (f != FinishReason::kNone) release(*c);
  }
  rows_.clear();
  forks_.clear();
  awaiting_update_ = false;
  return updates_;
}

void Scheduler::fork_request(int64_t parent_id, int64_t child_id) {
  if (!awaiting_update_)
    throw std::logic_error("Scheduler::fork_request: call it between schedule() and update()");
  if (requests_.count(child_id) != 0)
    throw std::invalid_argument("Scheduler::fork_request: request id " + std::to_string(child_id) +
                                " is already in the scheduler");
  Request& p = get(parent_id);
  const int32_t row = row_of(p);
  if (p.status != RequestStatus::kRunning || row < 0 || !last_output_->do_sample[row])
    throw std::logic_error("Scheduler::fork_request: request " + std::to_string(parent_id) +
                           " does not sample a token in this step");
  auto c = std::make_unique<Request>();
  c->id = child_id;
  c->tokens = p.tokens;
  c->num_prompt = p.num_prompt;
  c->stop = p.stop;
  c->stop_ids = p.stop_ids;
  c->num_stop_ids = p.num_stop_ids;
  c->min_stop_tokens = p.min_stop_tokens;
  c->max_num_tokens = p.max_num_tokens;
  c->priority = p.priority;
  c->cache_key = p.cache_key;
  c->arrival = arrival_counter_++;
  c->status = RequestStatus::kRunning;
  c->num_computed = last_output_->context_lens[row];
  blocks_.fork(p.table, c->table);
  Request* raw = c.get();
  auto it = std::upper_bound(running_.begin(), running_.end(), raw,
                             [this](const Request* a, const Request* b) { return before(*a, *b); });
  running_.insert(it, raw);
  ++num_active_running_;
  forks_.push_back(raw);
  requests_.emplace(child_id, std::move(c));
}

void Scheduler::release(Request& r) {
  if (r.status == RequestStatus::kWaiting) {
    auto it = std::find(waiting_.begin(), waiting_.end(), &r);
    if (it != waiting_.end()) waiting_.erase(it);
  } else if (r.status == RequestStatus::kRunning) {
    --num_active_running_;  // leaves running_ at the next compact()
  }
  if (const int32_t row = row_of(r); row >= 0) rows_[row] = nullptr;
  r.sched_step = -1;
  std::replace(forks_.begin(), forks_.end(), &r, static_cast<Request*>(nullptr));
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

std::span<const int32_t> Scheduler::tokens(int64_t request_id) const { return get(request_id).tokens; }

int32_t Scheduler::num_prompt_tokens(int64_t request_id) const { return get(request_id).num_prompt; }

int32_t Scheduler::num_computed_tokens(int64_t request_id) const {
  return get(request_id).num_computed;
}

std::span<const int32_t> Scheduler::block_table(int64_t request_id) const {
  return get(request_id).table.blocks();
}

std::vector<int64_t> Scheduler::running_ids() const {
  std::vector<int64_t> ids;
  for (const Request* r : running_)
    if (r->status == RequestStatus::kRunning) ids.push_back(r->id);
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
  for (const Request* r : running_) {
    if (r->status != RequestStatus::kRunning) continue;
    s.cache.waste_tokens += std::max<int64_t>(0, r->table.num_blocks() * bs - r->num_tokens());
  }
  return s;
}

}  // namespace flashpage
