// flashpage — the continuous-batching scheduler.
//
// Each step it picks which requests run and how many of their tokens: running decodes first
// (one token each), then running prompts still being prefilled, then waiting requests, within
// a per-step token budget (chunked prefill) and a sequence budget. When KV blocks run out it
// preempts the lowest-priority running request by recompute. The step is handed over as one
// flattened, unpadded batch of contiguous arrays (SchedulerOutput); update() takes the tokens the
// sampler produced and applies stop conditions. Not thread-safe: one thread (the engine loop)
// drives it.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "flashpage/block_manager.h"

namespace flashpage {

enum class SchedulingPolicy : int8_t { kFcfs = 0, kPriority = 1 };

enum class FinishReason : int8_t {
  kNone = 0,
  kStop = 1,    // a stop token id (eos included), or the caller said so (stop strings)
  kLength = 2,  // max_tokens or max_model_len reached
  kAbort = 3,
};
const char* finish_reason_name(FinishReason r);

enum class RequestStatus : int8_t { kWaiting = 0, kRunning = 1, kFinished = 2 };

struct SchedulerConfig {
  int32_t max_num_batched_tokens = 2048;  // tokens per step, decodes and prefill chunks
  int32_t max_num_seqs = 256;             // sequences per step
  int32_t max_model_len = 4096;           // prompt + output tokens of one sequence
  SchedulingPolicy policy = SchedulingPolicy::kFcfs;
  BlockManagerConfig cache;
};

// What the scheduler needs to know to stop a sequence (text stop strings live in Python).
struct StopParams {
  int32_t max_tokens = 16;
  int32_t min_tokens = 0;  // stop token ids are ignored until this many tokens are out
  std::vector<int32_t> stop_token_ids;
  std::vector<int32_t> eos_token_ids;
  bool ignore_eos = false;
};

struct RequestSpec {
  int64_t request_id = 0;
  std::vector<int32_t> prompt;
  StopParams stop;
  int32_t priority = 0;    // lower value runs first (as in vLLM)
  uint64_t cache_key = 0;  // extra prefix-cache key (adapters); 0 = none
};

// Raised for requests that can never be served (empty, too long, larger than the cache).
class RequestRejected : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Raised when a request id is not (or no longer) in the scheduler.
class UnknownRequest : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

// One engine step as contiguous arrays, ready for the kernels. Rows are the scheduled
// sequences, in the order of request_ids. Shared ownership: it stays valid and unchanged while
// anyone holds it, and the scheduler reuses one (no allocation per step) only when nobody else
// does.
struct SchedulerOutput {
  std::vector<int64_t> request_ids;      // [num_seqs]
  std::vector<int32_t> query_start_loc;  // [num_seqs + 1] offsets into the token arrays
  std::vector<int32_t> num_computed;     // [num_seqs] tokens already in the KV cache
  std::vector<int32_t> context_lens;     // [num_seqs] tokens in the cache after this step
  std::vector<uint8_t> do_sample;        // [num_seqs] 1 if this row yields the next token
  std::vector<int32_t> token_ids;        // [num_tokens]
  std::vector<int32_t> positions;        // [num_tokens]
  std::vector<int32_t> slot_mapping;     // [num_tokens] block * block_size + offset
  std::vector<int32_t> logits_indices;   // [num_seqs] index of each row's last token
  std::vector<int32_t> block_tables;     // [num_seqs, block_table_width], padded with -1
  int32_t block_table_width = 0;
  std::vector<BlockCopy> block_copies;   // copy-on-write, to run before attention
  std::vector<int64_t> preempted_ids;    // preempted during this schedule()
  std::vector<int64_t> finished_ids;     // finished or aborted since the previous schedule()
  int32_t num_prefill_tokens = 0;        // tokens of all other rows
  int32_t num_decode_seqs = 0;           // rows of one token that yield the next token

  void clear();
  int32_t num_seqs() const { return static_cast<int32_t>(request_ids.size()); }
  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
};

// What update() did to one request.
struct RequestUpdate {
  int64_t request_id;
  int32_t token;  // the new token, or -1 if this step produced none for it
  FinishReason finish;
};

struct SchedulerStats {
  int32_t num_waiting = 0;
  int32_t num_running = 0;
  int64_t num_preemptions = 0;
  int64_t num_steps = 0;
  BlockManagerStats cache;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerConfig& config() const { return config_; }
  BlockManager& block_manager() { return blocks_; }
  const BlockManager& block_manager() const { return blocks_; }

  // Queues a request. Throws RequestRejected if it can never run, std::invalid_argument for
  // a duplicate id or bad stop parameters.
  void add_request(RequestSpec spec);
  // Removes a request in any state and frees its blocks. Returns false if it is unknown
  // (already finished, say). Safe between schedule() and update().
  bool abort_request(int64_t request_id);
  // Finishes a request for a reason found by the caller (a stop string); frees its blocks.
  bool finish_request(int64_t request_id, FinishReason reason = FinishReason::kStop);
  // Starts `child_id` as a copy of `parent_id` that shares all of its KV blocks (n > 1,
  // copy-on-write). Call it between schedule() and update(), for a parent whose row in that
  // step samples a token; the child's own token for that step goes to update() in
  // `fork_tokens`, in the order of the fork_request() calls.
  void fork_request(int64_t parent_id, int64_t child_id);

  // Plans the next step. The returned object stays valid while referenced.
  std::shared_ptr<const SchedulerOutput> schedule();
  // Takes one sampled token per row of the last SchedulerOutput (rows with do_sample == 0 are
  // ignored) and one per fork_request() since that schedule(). Returns what happened to each
  // request that got a token or finished; valid until the next update(). After a step with
  // no rows, an empty update() is a no-op.
  const std::vector<RequestUpdate>& update(std::span<const int32_t> sampled,
                                           std::span<const int32_t> fork_tokens = {});

  bool has_unfinished() const { return !waiting_.empty() || num_active_running_ > 0; }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return num_active_running_; }
  bool contains(int64_t request_id) const { return requests_.count(request_id) != 0; }
  RequestStatus status(int64_t request_id) const;
  // Prompt followed by the output so far (valid until the scheduler next changes).
  std::span<const int32_t> tokens(int64_t request_id);
  int32_t num_prompt_tokens(int64_t request_id) const;
  int32_t num_computed_tokens(int64_t request_id) const;
  std::span<const int32_t> block_table(int64_t request_id) const;
  std::vector<int64_t> running_ids() const;
  std::vector<int64_t> waiting_ids() const;
  SchedulerStats stats() const;

  struct Request;  // internal

 private:
  // The hot state of one running request, in a dense array (slots_) that every step walks
  // front to back; the Request itself is touched only on rare events (a block fills, a stop id
  // may have matched, preemption). Slots are swap-removed at the start of schedule(), so their
  // order is not the scheduling order: (priority, arrival) decides wherever order matters.
  static constexpr int32_t kTail = 16;
  struct Slot {
    Request* req;           // nullptr once finished, aborted or preempted (until compaction)
    int32_t* tokens;        // the request's token buffer: prompt, then output, up to num_flushed
    const int32_t* blocks;  // the request's block table
    int64_t id;
    int64_t arrival;
    uint64_t stop_bloom;    // bit (id % 64) of every stop id: most tokens need no list lookup
    int32_t num_computed;   // tokens whose KV is in the cache
    int32_t num_tokens;
    int32_t num_flushed;    // tokens in the buffer; the rest (at most kTail) are in tail
    int32_t capacity;       // of the token buffer
    int32_t num_blocks;
    int32_t max_num_tokens;  // prompt + max_tokens, capped at max_model_len
    int32_t min_stop_tokens;  // stop ids count from this many tokens on (prompt + min_tokens)
    int32_t cached_tokens;   // tokens in blocks registered in the prefix cache
    int32_t priority;
    int32_t last_token;
    uint32_t sched_step;     // the step that scheduled it last
    int32_t sched_idx;       // its index in scheduled_ when sched_step == step_id_
    bool may_share_tail;     // the next write may need a copy-on-write block
    // The newest sampled tokens, written to the buffer kTail at a time (or when a consumer
    // needs them): one random write per kTail steps instead of one per step.
    int32_t tail[kTail];
  };

  // One row of the step being planned, with a copy of what the output needs.
  struct Scheduled {
    int32_t slot;
    int32_t num_new;  // 0 once unscheduled
    int32_t row;      // its row in the SchedulerOutput, set by build_output()
    int32_t num_computed;
    int32_t num_tokens;
    int32_t num_blocks;
    int32_t last_token;
    int64_t id;
    const int32_t* tokens;  // stable during the step: buffers grow only in update()
    const int32_t* blocks;
  };

  Request& get(int64_t request_id) const;
  bool before(const Request& a, const Request& b) const;  // scheduling order
  bool slot_before(const Slot& a, const Slot& b) const;
  void insert_waiting(Request* r);
  void make_slot(Request& r);
  void refresh_blocks(Slot& sl);
  bool allocate(int32_t slot, int32_t num_new, SchedulerOutput& out);
  void add_scheduled(int32_t slot, int32_t num_new);
  void preempt(int32_t slot, SchedulerOutput& out);
  int32_t lowest_priority_slot() const;
  bool preempt_for(const Request& w, int32_t blocks_short, bool needs_seq_slot, SchedulerOutput& out);
  void schedule_decodes(SchedulerOutput& out);
  void schedule_prefills(SchedulerOutput& out);
  void admit_waiting(SchedulerOutput& out);
  FinishReason append_token(Slot& sl, int32_t token);
  void flush_tokens(Slot& sl);
  void release(Request& r);
  void compact();
  int32_t row_of(const Request& r) const;  // row in the last step, or -1
  void build_output(SchedulerOutput& out);
  std::shared_ptr<SchedulerOutput> fresh_output();

  SchedulerConfig config_;
  BlockManager blocks_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;  // in scheduling order
  std::vector<Slot> slots_;       // running requests (and dead slots until compaction)
  std::vector<Scheduled> scheduled_;
  std::vector<int32_t> prefilling_;  // slots with more than one token to compute
  std::vector<int32_t> victims_;     // scratch for priority preemption
  std::vector<int32_t> row_slots_;   // the last SchedulerOutput's rows; -1 once aborted
  std::vector<int32_t> forks_;       // slots forked since the last schedule()
  std::vector<int32_t> fill_slots_;  // update(): slots whose computed tokens filled a block
  std::vector<Request*> finishing_;  // update(): released once their blocks are cached
  std::vector<BlockManager::CacheUpdate> cache_updates_;
  std::vector<std::unique_ptr<Request>> retired_;  // finished, freed at the next compact()
  std::vector<int64_t> finished_since_step_;
  std::vector<RequestUpdate> updates_;
  std::shared_ptr<SchedulerOutput> outputs_[2];
  std::shared_ptr<const SchedulerOutput> last_output_;
  int32_t budget_tokens_ = 0;
  int32_t budget_seqs_ = 0;
  int32_t num_active_running_ = 0;
  int32_t num_dead_slots_ = 0;
  bool preempted_this_step_ = false;
  int64_t arrival_counter_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_steps_ = 0;
  uint32_t step_id_ = 0;  // the step being planned, or the last one planned
  bool awaiting_update_ = false;
};

}  // namespace flashpage
