#include <algorithm>
#include <map>
#include <numeric>

#include "flashpage/scheduler.h"
#include "test_util.h"

using namespace flashpage;

namespace {

SchedulerConfig make_config(int num_blocks, int block_size = 4, int max_tokens_per_step = 64,
                            int max_seqs = 8, SchedulingPolicy policy = SchedulingPolicy::kFcfs) {
  SchedulerConfig c;
  c.cache = {num_blocks, block_size, true};
  c.max_num_batched_tokens = max_tokens_per_step;
  c.max_num_seqs = max_seqs;
  c.max_model_len = 256;
  c.policy = policy;
  return c;
}

RequestSpec make_request(int64_t id, int prompt_len, int max_tokens, int priority = 0, int base = 0) {
  RequestSpec r;
  r.request_id = id;
  r.prompt.resize(prompt_len);
  std::iota(r.prompt.begin(), r.prompt.end(), base);
  r.stop.max_tokens = max_tokens;
  r.priority = priority;
  return r;
}

// A deterministic "model": the next token is a function of the last one and the position, so
// a recomputed request produces the same output as one that was never preempted.
int32_t fake_next(std::span<const int32_t> tokens) {
  return (tokens.back() * 31 + static_cast<int32_t>(tokens.size()) * 7) % 1000 + 1;
}

// Runs to completion; returns each request's output tokens.
std::map<int64_t, std::vector<int32_t>> run_all(Scheduler& s, int max_steps = 10000) {
  std::map<int64_t, std::vector<int32_t>> outputs;
  std::vector<int32_t> sampled;
  for (int step = 0; step < max_steps && s.has_unfinished(); ++step) {
    auto out = s.schedule();
    sampled.assign(out->num_seqs(), 0);
    for (int i = 0; i < out->num_seqs(); ++i)
      if (out->do_sample[i]) sampled[i] = fake_next(s.tokens(out->request_ids[i]));
    if (out->num_seqs() == 0) continue;
    for (const auto& u : s.update(sampled)) outputs[u.request_id].push_back(u.token);
  }
  return outputs;
}

}  // namespace

TEST(scheduler_runs_requests_to_max_tokens) {
  Scheduler s(make_config(64));
  for (int i = 0; i < 3; ++i) s.add_request(make_request(i, 5 + i, 4));
  auto out = run_all(s);
  for (int i = 0; i < 3; ++i) CHECK_EQ(out[i].size(), 4u);
  CHECK(!s.has_unfinished());
  CHECK_EQ(s.block_manager().num_free_blocks(), 64);
}

TEST(scheduler_step_arrays_are_consistent) {
  Scheduler s(make_config(64, 4, 64));
  s.add_request(make_request(1, 6, 3));
  s.add_request(make_request(2, 3, 3, 0, 100));
  auto out = s.schedule();
  REQUIRE(out->num_seqs() == 2);
  CHECK_EQ(out->num_tokens(), 9);
  CHECK_EQ(out->query_start_loc[1], 6);
  CHECK_EQ(out->query_start_loc[2], 9);
  CHECK_EQ(out->logits_indices[0], 5);
  CHECK_EQ(out->logits_indices[1], 8);
  CHECK_EQ(out->block_table_width, 2);
  for (int i = 0; i < 2; ++i) {
    for (int t = out->query_start_loc[i]; t < out->query_start_loc[i + 1]; ++t) {
      const int pos = out->positions[t];
      const int block = out->block_tables[i * out->block_table_width + pos / 4];
      CHECK_EQ(out->slot_mapping[t], block * 4 + pos % 4);
    }
  }
  CHECK_EQ(out->block_tables[1 * 2 + 1], -1);  // padding
  CHECK_EQ(out->token_ids[6], 100);
}

TEST(scheduler_chunked_prefill_never_stalls_decodes) {
  Scheduler s(make_config(256, 4, 16, 8));
  s.add_request(make_request(1, 4, 50));
  std::vector<int32_t> one(1, 7);
  s.schedule();
  s.update(one);  // request 1 is now decoding
  s.add_request(make_request(2, 100, 2));  // a long prompt: 100 tokens, budget 16
  int chunks = 0;
  while (s.status(2) != RequestStatus::kRunning || s.num_computed_tokens(2) < 100) {
    auto out = s.schedule();
    CHECK(out->num_tokens() <= 16);
    REQUIRE(out->num_seqs() >= 1);
    CHECK_EQ(out->request_ids[0], 1);  // the decode goes first, every step
    CHECK_EQ(out->query_start_loc[1], 1);
    if (out->num_seqs() == 2) ++chunks;
    std::vector<int32_t> sampled(out->num_seqs(), 9);
    s.update(sampled);
    if (!s.contains(2)) break;
  }
  CHECK(chunks >= 7);  // 100 tokens in chunks of at most 15
}

TEST(scheduler_respects_sequence_budget) {
  Scheduler s(make_config(256, 4, 64, 2));
  for (int i = 0; i < 5; ++i) s.add_request(make_request(i, 3, 2));
  auto out = s.schedule();
  CHECK_EQ(out->num_seqs(), 2);
  CHECK_EQ(s.num_waiting(), 3);
}

TEST(scheduler_rejects_impossible_requests) {
  Scheduler s(make_config(4, 4));  // 16 tokens of KV in total
  CHECK_THROWS(RequestRejected, s.add_request(make_request(1, 20, 1)), "blocks");
  CHECK_THROWS(RequestRejected, s.add_request(make_request(2, 0, 1)), "empty");
  CHECK_THROWS(RequestRejected, s.add_request(make_request(3, 300, 1)), "max_model_len");
  CHECK_THROWS(std::invalid_argument, s.add_request(make_request(4, 4, 0)), "max_tokens");
  CHECK_THROWS(std::invalid_argument, s.add_request(make_request(5, 4, 4, 3)), "priority");
  s.add_request(make_request(6, 4, 2));
  CHECK_THROWS(std::invalid_argument, s.add_request(make_request(6, 4, 2)), "already");
  CHECK_THROWS(std::invalid_argument, Scheduler(make_config(4, 4, 4, 8)), "max_num_batched_tokens");
}

TEST(scheduler_preempts_by_recompute_with_the_same_output) {
  // Alone, each request runs undisturbed; together, 6 blocks are too few and the youngest is
  // preempted and recomputed. Outputs must be the same.
  std::map<int64_t, std::vector<int32_t>> alone;
  for (int i = 0; i < 3; ++i) {
    Scheduler s(make_config(64));
    s.add_request(make_request(i, 6, 10, 0, i * 50));
    alone[i] = run_all(s)[i];
  }
  Scheduler s(make_config(9));
  for (int i = 0; i < 3; ++i) s.add_request(make_request(i, 6, 10, 0, i * 50));
  auto together = run_all(s);
  CHECK(s.stats().num_preemptions > 0);
  for (int i = 0; i < 3; ++i) CHECK(together[i] == alone[i]);
  CHECK_EQ(s.block_manager().num_free_blocks(), 9);
}

TEST(scheduler_abort_from_every_state) {
  Scheduler s(make_config(64, 4, 8, 8));
  s.add_request(make_request(1, 4, 8));
  s.add_request(make_request(2, 20, 8));  // still prefilling after step 1
  s.add_request(make_request(3, 4, 8));   // waiting (budget)
  auto out = s.schedule();
  CHECK(s.abort_request(1));  // running, between schedule() and update()
  std::vector<int32_t> sampled(out->num_seqs(), 5);
  const auto& ups = s.update(sampled);
  for (const auto& u : ups) CHECK(u.request_id != 1);
  CHECK_EQ(s.status(3), RequestStatus::kWaiting);
  CHECK(s.abort_request(3));  // waiting
  CHECK(s.abort_request(2));  // running, mid-prefill
  CHECK(!s.abort_request(2));
  CHECK(!s.has_unfinished());
  CHECK_EQ(s.block_manager().num_free_blocks(), 64);
  auto next = s.schedule();
  CHECK_EQ(next->finished_ids.size(), 3u);
}

TEST(scheduler_stop_tokens_min_tokens_and_eos) {
  Scheduler s(make_config(64));
  RequestSpec r = make_request(1, 4, 10);
  r.stop.eos_token_ids = {2};
  r.stop.stop_token_ids = {3};
  r.stop.min_tokens = 2;
  s.add_request(r);
  std::vector<int32_t> tok(1);
  auto step = [&](int32_t t) {
    s.schedule();
    tok[0] = t;
    return s.update(tok).at(0).finish;
  };
  CHECK(step(2) == FinishReason::kNone);  // eos before min_tokens
  CHECK(step(3) == FinishReason::kStop);  // stop token at min_tokens
  RequestSpec q = make_request(2, 4, 3);
  q.stop.eos_token_ids = {2};
  q.stop.ignore_eos = true;
  s.add_request(q);
  CHECK(step(2) == FinishReason::kNone);
  CHECK(step(2) == FinishReason::kNone);
  CHECK(step(2) == FinishReason::kLength);
  s.add_request(make_request(3, 4, 10));
  s.schedule();
  tok[0] = 9;
  s.update(tok);
  CHECK(s.finish_request(3, FinishReason::kStop));  // a stop string, found by the caller
  CHECK(!s.has_unfinished());
}

TEST(scheduler_priority_preempts_lower_priority_without_thrashing) {
  // 10 blocks of 4: two running low-priority requests (4 blocks each) nearly fill the cache.
  Scheduler s(make_config(10, 4, 64, 8, SchedulingPolicy::kPriority));
  s.add_request(make_request(1, 14, 20, 5));
  s.add_request(make_request(2, 14, 20, 5, 100));
  std::vector<int32_t> sampled;
  auto step = [&] {
    auto out = s.schedule();
    sampled.assign(out->num_seqs(), 1);
    if (out->num_seqs()) s.update(sampled);
    return out;
  };
  step();
  CHECK_EQ(s.num_running(), 2);
  s.add_request(make_request(3, 10, 3, 0, 200));  // urgent
  auto out = step();
  REQUIRE(out->preempted_ids.size() == 1);
  CHECK_EQ(out->preempted_ids[0], 2);  // the lowest priority, latest arrival
  CHECK_EQ(s.status(3), RequestStatus::kRunning);
  // A second urgent request must not preempt request 2 again before it progressed; it
  // takes request 1 or waits.
  s.add_request(make_request(4, 10, 3, 0, 300));
  int preempted_2_again = 0;
  while (s.has_unfinished()) {
    const int32_t outputs_before = s.contains(2) ? static_cast<int32_t>(s.tokens(2).size()) : 0;
    auto o = step();
    for (int64_t id : o->preempted_ids)
      if (id == 2 && outputs_before == 14 + 1) ++preempted_2_again;
  }
  CHECK_EQ(preempted_2_again, 0);
  CHECK_EQ(s.block_manager().num_free_blocks(), 10);
}

TEST(scheduler_fork_shares_prompt_blocks) {
  Scheduler s(make_config(32, 4));
  s.add_request(make_request(1, 6, 4));
  auto out = s.schedule();
  s.fork_request(1, 2);
  s.fork_request(1, 3);
  CHECK(s.block_table(2)[0] == s.block_table(1)[0]);
  CHECK_EQ(s.block_manager().ref_count(s.block_table(1)[1]), 3);
  std::vector<int32_t> sampled{10};
  std::vector<int32_t> forks{11, 12};
  CHECK_EQ(s.update(sampled, forks).size(), 3u);
  auto next = s.schedule();
  CHECK_EQ(next->num_seqs(), 3);
  CHECK_EQ(next->block_copies.size(), 2u);  // two of three copy the shared partial block
  CHECK_EQ(s.tokens(3).back(), 12);
  sampled.assign(3, 1);
  s.update(sampled);
  auto rest = run_all(s);
  CHECK(!s.has_unfinished());
  CHECK_EQ(s.block_manager().num_free_blocks(), 32);
}

TEST(scheduler_prefix_cache_reuses_blocks_across_requests) {
  Scheduler s(make_config(64, 4));
  s.add_request(make_request(1, 13, 2));
  run_all(s);
  s.add_request(make_request(2, 13, 2));
  auto out = s.schedule();
  CHECK_EQ(out->num_computed[0], 12);  // 3 cached blocks, 1 token to compute
  CHECK_EQ(out->num_tokens(), 1);
  CHECK_EQ(s.stats().cache.prefix_hits, 12);
}

TEST(scheduler_tokens_survive_the_recent_token_buffer) {
  // 45 outputs with 32-token blocks: the slot's recent-token buffer fills and flushes on its
  // own (not only at block boundaries); tokens() must still return everything in order.
  Scheduler s(make_config(64, 32));
  s.add_request(make_request(1, 5, 50));
  std::vector<int32_t> expected(s.tokens(1).begin(), s.tokens(1).end());
  std::vector<int32_t> tok(1);
  for (int k = 0; k < 45; ++k) {
    s.schedule();
    tok[0] = 100 + k;
    expected.push_back(tok[0]);
    s.update(tok);
  }
  const auto got = s.tokens(1);
  CHECK(std::vector<int32_t>(got.begin(), got.end()) == expected);
  auto out = s.schedule();  // the next decode's input is the last token
  CHECK_EQ(out->token_ids[0], 144);
  CHECK_EQ(out->positions[0], 49);
}
