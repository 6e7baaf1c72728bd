// Routing records (runtime/routing): file round trip, corrupt-file errors, diff and stats on
// planted data, and the `keel routes` CLI entry point.
//
// Design note. Every expectation is hand-computed from small synthetic files built here, so a
// failure points at the format or the analysis, never at a model: the diff tests plant exactly
// one slot swap and two expert flips and check the counts and the reported first divergence;
// the stats test uses a 3-token file small enough to count on paper.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/base/check.h"
#include "runtime/cli/routes_cmd.h"
#include "runtime/routing/routing_file.h"
#include "runtime/tools/routing_analysis/analysis.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

class RoutingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        fs::temp_directory_path() /
        ("keel_test_routing_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
         "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

// 3 decoder layers, all MoE, 8 experts, top-2.
RoutingFileHeader small_header() {
  RoutingFileHeader header;
  header.model = "tiny";
  header.model_dir = "/models/tiny";
  header.architecture = "qwen3_moe";
  header.num_layers = 3;
  header.moe_layers = {0, 1, 2};
  header.num_experts = 8;
  header.top_k = 2;
  header.tp = 4;
  header.placement = "round_robin";
  header.reduce = "fixed_order";
  header.determinism = "batch_invariant";
  header.dtype = "bf16";
  header.combine = "fp32";
  header.quantization = "modelopt";
  header.nvfp4_activations = "w4a4";
  header.kv_cache_dtype = "bf16";
  header.git_revision = "abc123";
  header.created_unix = 1700000000;
  header.extra = {{"note", "test"}, {"nested", {1, 2, 3}}};
  return header;
}

// Deterministic record: row (t, l) picks experts (a, b) distinct, weights and margins varied.
RoutingRecord make_record(const RoutingFileHeader& header, const std::string& id, int64_t rows,
                          uint32_t salt) {
  RoutingRecord record;
  record.request_id = id;
  record.seq_id = salt;
  for (int64_t i = 0; i < rows / 2 + 1; ++i)
    record.prompt_token_ids.push_back(static_cast<int32_t>(100 + i + salt));
  for (int64_t i = 0; i < rows - rows / 2; ++i)
    record.output_token_ids.push_back(static_cast<int32_t>(7 * i + salt));
  record.sampling = {0.7, 0.9, 40, 0xfedcba9876543210ull + salt};
  record.logits_digest = "00ff" + std::to_string(salt);
  record.num_tokens = rows;
  const size_t layers = header.num_moe_layers();
  const auto experts = static_cast<uint32_t>(header.num_experts);
  for (int64_t t = 0; t < rows; ++t) {
    for (size_t l = 0; l < layers; ++l) {
      uint32_t h =
          static_cast<uint32_t>(t) * 2654435761u + static_cast<uint32_t>(l) * 40503u + salt * 97u;
      const auto first = static_cast<int32_t>(h % experts);
      const auto second = static_cast<int32_t>((h / experts % (experts - 1) + first + 1) % experts);
      record.expert_ids.push_back(first);
      record.expert_ids.push_back(second);
      record.weights.push_back(0.5f + static_cast<float>(h % 1000) * 1e-4f);
      record.weights.push_back(0.5f - static_cast<float>(h % 1000) * 1e-4f);
      record.margins.push_back(static_cast<float>(h % 10007) * 1.37e-5f);
    }
  }
  return record;
}

RoutingFile make_file(size_t requests, int64_t rows) {
  RoutingFile file;
  file.header = small_header();
  for (size_t i = 0; i < requests; ++i) {
    file.records.push_back(make_record(file.header, "req-" + std::to_string(i),
                                       rows + static_cast<int64_t>(i % 3),
                                       static_cast<uint32_t>(i)));
  }
  return file;
}

template <typename T>
bool bits_equal(const std::vector<T>& x, const std::vector<T>& y) {
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::bit_cast<std::array<char, sizeof(T)>>(x[i]) !=
        std::bit_cast<std::array<char, sizeof(T)>>(y[i])) {
      return false;
    }
  }
  return true;
}

void expect_same_record(const RoutingRecord& x, const RoutingRecord& y) {
  EXPECT_EQ(x.request_id, y.request_id);
  EXPECT_EQ(x.seq_id, y.seq_id);
  EXPECT_EQ(x.prompt_token_ids, y.prompt_token_ids);
  EXPECT_EQ(x.output_token_ids, y.output_token_ids);
  EXPECT_EQ(std::bit_cast<uint64_t>(x.sampling.temperature),
            std::bit_cast<uint64_t>(y.sampling.temperature));
  EXPECT_EQ(std::bit_cast<uint64_t>(x.sampling.top_p), std::bit_cast<uint64_t>(y.sampling.top_p));
  EXPECT_EQ(x.sampling.top_k, y.sampling.top_k);
  EXPECT_EQ(x.sampling.seed, y.sampling.seed);
  EXPECT_EQ(x.logits_digest, y.logits_digest);
  EXPECT_EQ(x.num_tokens, y.num_tokens);
  EXPECT_EQ(x.expert_ids, y.expert_ids);
  EXPECT_TRUE(bits_equal(x.weights, y.weights));
  EXPECT_TRUE(bits_equal(x.margins, y.margins));
}

// Runs fn and expects a keel::Error whose message contains every fragment.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected keel::Error containing '" << fragments.front() << "'";
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message '" << message << "' lacks '" << fragment << "'";
    }
  }
}

std::string read_bytes(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& file, const std::string& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void put_u32_at(std::string& bytes, size_t offset, uint32_t value) {
  for (int i = 0; i < 4; ++i)
    bytes[offset + static_cast<size_t>(i)] = static_cast<char>(value >> (8 * i));
}

// ---- round trip ---------------------------------------------------------------------------

TEST_F(RoutingTest, RoundTripIsBitExact) {
  RoutingFile file = make_file(60, 9);
  // Edge cases: a request with no rows and no output; awkward float bit patterns.
  RoutingRecord empty = make_record(file.header, "empty", 0, 99);
  empty.output_token_ids.clear();
  empty.logits_digest = "";
  file.records.insert(file.records.begin() + 3, empty);
  RoutingRecord& odd = file.records[5];
  odd.weights[0] = -0.0f;
  odd.weights[1] = std::numeric_limits<float>::denorm_min();
  odd.margins[0] = std::numeric_limits<float>::infinity();
  odd.margins[1] = std::nextafter(1e-4f, 0.0f);
  odd.sampling.temperature = 0.1 + 0.2;  // not representable exactly: bits must survive JSON
  odd.request_id = "unicode \xc3\xa9 \"quoted\"";

  const std::string out = path("roundtrip.keelrout");
  write_routing_file(out, file);

  RoutingReader reader(out);
  EXPECT_EQ(reader.header().to_json(), file.header.to_json());
  EXPECT_EQ(reader.header().extra["nested"][2], 3);
  RoutingRecord record;
  size_t count = 0;
  while (reader.next(record)) {
    ASSERT_LT(count, file.records.size());
    expect_same_record(record, file.records[count]);
    ++count;
  }
  EXPECT_EQ(count, file.records.size());
  EXPECT_EQ(reader.records_read(), static_cast<int64_t>(file.records.size()));
  EXPECT_FALSE(reader.next(record));  // stays at the end

  // The file size is exactly what the format says.
  size_t expected = 16 + file.header.to_json().dump().size();
  for (const RoutingRecord& r : file.records) {
    expected +=
        4 + r.metadata_json().dump().size() + static_cast<size_t>(r.num_tokens) * 3 * (8 * 2 + 4);
  }
  EXPECT_EQ(fs::file_size(out), expected);
  EXPECT_EQ(read_bytes(out).substr(0, 8), "KEELROUT");
}

// The numerics fields survive a round trip, are optional (files written before they existed
// read back with them empty), and `routes diff` names a difference in any of them.
TEST_F(RoutingTest, NumericsFieldsInTheHeader) {
  const RoutingFileHeader header = small_header();
  nlohmann::json json = header.to_json();
  const RoutingFileHeader back = RoutingFileHeader::from_json(json, "test");
  EXPECT_EQ(back.quantization, "modelopt");
  EXPECT_EQ(back.nvfp4_activations, "w4a4");
  EXPECT_EQ(back.kv_cache_dtype, "bf16");
  json.erase("quantization");
  json.erase("nvfp4_activations");
  json.erase("kv_cache_dtype");
  const RoutingFileHeader old = RoutingFileHeader::from_json(json, "old file");
  EXPECT_TRUE(old.quantization.empty() && old.nvfp4_activations.empty() &&
              old.kv_cache_dtype.empty());
  json["kv_cache_dtype"] = 3;
  EXPECT_THROW(RoutingFileHeader::from_json(json, "bad"), Error);

  RoutingFile a = make_file(4, 1);
  RoutingFile b = a;
  b.header.nvfp4_activations = "fp32";
  b.header.kv_cache_dtype = "fp8_e4m3";
  const RoutingDiff diff = diff_routing(a, b);
  EXPECT_NE(std::find(diff.header_differences.begin(), diff.header_differences.end(),
                      "nvfp4_activations: w4a4 vs fp32"),
            diff.header_differences.end());
  EXPECT_NE(std::find(diff.header_differences.begin(), diff.header_differences.end(),
                      "kv_cache_dtype: bf16 vs fp8_e4m3"),
            diff.header_differences.end());
}

TEST_F(RoutingTest, HeaderOnlyFileAndIncrementalWriter) {
  const std::string out = path("incremental.keelrout");
  RoutingFileHeader header = small_header();
  {
    RoutingWriter writer(out, header);
    writer.flush();
    EXPECT_TRUE(read_routing_file(out).records.empty());  // a flushed header alone is valid
    writer.append(make_record(header, "a", 4, 1));
    writer.flush();
    EXPECT_EQ(read_routing_file(out).records.size(), 1u);
    writer.append(make_record(header, "b", 5, 2));
    EXPECT_EQ(writer.records_written(), 2);
  }  // RAII close
  const RoutingFile back = read_routing_file(out);
  ASSERT_EQ(back.records.size(), 2u);
  expect_same_record(back.records[1], make_record(header, "b", 5, 2));
}

// ---- errors -------------------------------------------------------------------------------

TEST_F(RoutingTest, CorruptFilesNameWhatIsWrong) {
  const std::string good = path("good.keelrout");
  write_routing_file(good, make_file(3, 6));
  const std::string bytes = read_bytes(good);
  const std::string bad = path("bad.keelrout");
  auto read_bad = [&] { read_routing_file(bad); };

  std::string mutated = bytes;
  mutated[0] = 'X';
  write_bytes(bad, mutated);
  expect_error(read_bad, {bad, "bad magic", "XEELROUT"});

  mutated = bytes;
  put_u32_at(mutated, 8, 2);
  write_bytes(bad, mutated);
  expect_error(read_bad, {bad, "unsupported version 2"});

  mutated = bytes;
  put_u32_at(mutated, 12, 1u << 30);
  write_bytes(bad, mutated);
  expect_error(read_bad, {bad, "header JSON length 1073741824 runs past the end"});

  write_bytes(bad, bytes.substr(0, 10));
  expect_error(read_bad, {bad, "truncated", "10 bytes"});

  mutated = bytes;
  mutated[16] = '#';  // header JSON no longer parses
  write_bytes(bad, mutated);
  expect_error(read_bad, {bad, "header JSON does not parse"});

  // Last record missing its final bytes: rows missing in record 2.
  write_bytes(bad, bytes.substr(0, bytes.size() - 5));
  expect_error(read_bad, {bad, "record 2", "rows missing", "num_tokens = 8"});

  // Stray bytes after the last record: a partial length prefix for record 3.
  write_bytes(bad, bytes + std::string(2, '\0'));
  expect_error(read_bad, {bad, "record 3", "truncated", "4-byte record length"});

  // Record length prefix promising more than the file holds.
  std::string tail(4, '\0');
  put_u32_at(tail, 0, 1000);
  write_bytes(bad, bytes + tail + "{}");
  expect_error(read_bad, {bad, "record 3", "record JSON length 1000 runs past the end"});

  // A record without num_tokens.
  tail = std::string(4, '\0');
  put_u32_at(tail, 0, 2);
  write_bytes(bad, bytes + tail + "{}");
  expect_error(read_bad, {bad, "record 3", "missing required key \"num_tokens\""});

  // An expert id out of range in the rows of record 0 (first id of the first row).
  RoutingFile file = make_file(1, 2);
  write_routing_file(bad, file);
  mutated = read_bytes(bad);
  const size_t rows_start = mutated.size() - 2 * 3 * 20;
  put_u32_at(mutated, rows_start, 8);
  write_bytes(bad, mutated);
  expect_error(read_bad, {bad, "record 0", "token 0, layer 0, slot 0: expert id 8 outside [0, 8)"});

  expect_error([&] { read_routing_file(path("missing.keelrout")); },
               {"missing.keelrout", "cannot open"});
}

TEST_F(RoutingTest, WriterRejectsInconsistentRecordsAndHeaders) {
  RoutingFileHeader header = small_header();
  RoutingWriter writer(path("w.keelrout"), header);
  RoutingRecord record = make_record(header, "x", 3, 1);
  record.margins.pop_back();
  expect_error([&] { writer.append(record); }, {"record 0", "margins 8 (want 9)"});
  record = make_record(header, "x", 3, 1);
  record.expert_ids[5] = -1;
  expect_error([&] { writer.append(record); },
               {"record 0", "token 0, layer 2, slot 1: expert id -1"});
  EXPECT_EQ(writer.records_written(), 0);

  header.top_k = 9;
  expect_error([&] { RoutingWriter w(path("h.keelrout"), header); },
               {"top_k must be in [1, num_experts = 8]"});
  header = small_header();
  header.moe_layers = {0, 3};
  expect_error([&] { RoutingWriter w(path("h.keelrout"), header); }, {"moe_layers entry 3"});
}

// ---- diff ---------------------------------------------------------------------------------

TEST_F(RoutingTest, DiffOfIdenticalFilesFindsNothing) {
  const RoutingFile a = make_file(5, 10);
  const RoutingDiff diff = diff_routing(a, a);
  EXPECT_TRUE(diff.identical());
  EXPECT_FALSE(diff.first_divergence.found);
  EXPECT_FALSE(diff.first_order_difference.found);
  EXPECT_EQ(diff.paired_by, "request_id");
  EXPECT_EQ(diff.requests_paired, 5);
  EXPECT_EQ(diff.set_flips, 0);
  EXPECT_EQ(diff.order_only, 0);
  EXPECT_EQ(diff.score_only, 0);
  EXPECT_TRUE(diff.header_differences.empty());
  EXPECT_EQ(diff.rows_compared, 10 + 11 + 12 + 10 + 11);
  EXPECT_EQ(diff.decisions_compared, 3 * diff.rows_compared);
  EXPECT_TRUE(diff.requests.empty());
}

// Swap slots of one decision and flip one expert at two decisions; check every count.
TEST_F(RoutingTest, DiffFindsPlantedDivergences) {
  const RoutingFile a = make_file(5, 10);
  RoutingFile b = a;
  const size_t layers = 3;
  // Order-only: request 0, token 3, layer 2.
  {
    RoutingRecord& r = b.records[0];
    const size_t base = RoutingRecord::slot_offset(3, 2, layers, 2);
    std::swap(r.expert_ids[base], r.expert_ids[base + 1]);
    std::swap(r.weights[base], r.weights[base + 1]);
  }
  // Flips in request 2: token 7 layer 1 (the first), token 9 layer 0.
  auto flip = [&](int64_t t, size_t l, float margin) {
    RoutingRecord& r = b.records[2];
    const size_t base = RoutingRecord::slot_offset(t, l, layers, 2);
    int32_t replacement = 0;
    while (replacement == r.expert_ids[base] || replacement == r.expert_ids[base + 1])
      ++replacement;
    r.expert_ids[base + 1] = replacement;
    r.margins[RoutingRecord::margin_offset(t, l, layers)] = margin;
  };
  flip(7, 1, 3e-6f);
  flip(9, 0, 1e-3f);
  b.records[2].output_token_ids.back() += 1;
  // Score-only: same experts, one weight bit different (request 4, token 0, layer 0).
  b.records[4].weights[0] = std::nextafter(b.records[4].weights[0], 2.0f);
  // b's requests in another order: pairing must follow request_id.
  std::swap(b.records[1], b.records[3]);
  b.header.model = "tiny-renamed";  // reported, not fatal
  b.header.git_revision = "zzz";    // not even reported

  const RoutingDiff diff = diff_routing(a, b);
  EXPECT_FALSE(diff.identical());
  EXPECT_EQ(diff.paired_by, "request_id");
  ASSERT_EQ(diff.header_differences.size(), 1u);
  EXPECT_EQ(diff.header_differences[0], "model: tiny vs tiny-renamed");

  ASSERT_TRUE(diff.first_divergence.found);
  const RoutingDivergence& d = diff.first_divergence;
  EXPECT_EQ(d.request_id, "req-2");
  EXPECT_EQ(d.request_index_a, 2);
  EXPECT_EQ(d.request_index_b, 2);
  EXPECT_EQ(d.position, 7);
  EXPECT_EQ(d.layer, 1);
  const size_t base = RoutingRecord::slot_offset(7, 1, layers, 2);
  EXPECT_EQ(d.experts_a, (std::vector<int32_t>{a.records[2].expert_ids[base],
                                               a.records[2].expert_ids[base + 1]}));
  EXPECT_EQ(d.experts_b, (std::vector<int32_t>{b.records[2].expert_ids[base],
                                               b.records[2].expert_ids[base + 1]}));
  EXPECT_NE(d.experts_a, d.experts_b);
  EXPECT_EQ(d.margin_a, a.records[2].margins[RoutingRecord::margin_offset(7, 1, layers)]);
  EXPECT_EQ(d.margin_b, 3e-6f);

  ASSERT_TRUE(diff.first_order_difference.found);
  EXPECT_EQ(diff.first_order_difference.request_id, "req-0");
  EXPECT_EQ(diff.first_order_difference.position, 3);
  EXPECT_EQ(diff.first_order_difference.layer, 2);

  EXPECT_EQ(diff.set_flips, 2);
  EXPECT_EQ(diff.order_only, 1);
  EXPECT_EQ(diff.score_only, 1);
  EXPECT_EQ(diff.set_flips_per_layer, (std::vector<int64_t>{1, 1, 0}));
  EXPECT_EQ(diff.order_only_per_layer, (std::vector<int64_t>{0, 0, 1}));
  EXPECT_EQ(diff.outputs_differ, std::vector<std::string>{"req-2"});
  EXPECT_EQ(diff.rows_only_a, 0);
  ASSERT_EQ(diff.requests.size(), 3u);  // req-0 (order), req-2 (flips + output), req-4 (score)
  EXPECT_EQ(diff.requests[1].request_id, "req-2");
  EXPECT_EQ(diff.requests[1].set_flips, 2);
  EXPECT_EQ(diff.requests[1].first_flip_position, 7);
  EXPECT_TRUE(diff.requests[1].output_differs);
  EXPECT_EQ(diff.requests[1].first_output_difference,
            static_cast<int64_t>(a.records[2].output_token_ids.size()) - 1);

  // JSON and text renderers carry the same facts.
  const nlohmann::json json = routing_diff_to_json(diff);
  EXPECT_EQ(json["first_divergence"]["position"], 7);
  EXPECT_EQ(json["first_divergence"]["layer"], 1);
  EXPECT_EQ(json["set_flips"], 2);
  EXPECT_EQ(json["identical"], false);
  const std::string text = render_routing_diff_text(diff);
  EXPECT_NE(text.find("first divergence: request req-2 (a #2, b #2), position 7, layer 1"),
            std::string::npos)
      << text;
}

TEST_F(RoutingTest, DiffCountsRowsOnOneSideAndPairsByOrderWithoutIds) {
  RoutingFile a = make_file(3, 10);
  for (RoutingRecord& r : a.records) r.request_id = "";
  RoutingFile b = a;
  // b's request 1 stops 4 rows early; b has one extra request.
  RoutingRecord& shorter = b.records[1];
  shorter.num_tokens -= 4;
  shorter.expert_ids.resize(static_cast<size_t>(shorter.num_tokens) * 3 * 2);
  shorter.weights.resize(shorter.expert_ids.size());
  shorter.margins.resize(static_cast<size_t>(shorter.num_tokens) * 3);
  b.records.push_back(make_record(b.header, "", 2, 42));

  const RoutingDiff diff = diff_routing(a, b);
  EXPECT_EQ(diff.paired_by, "order");
  EXPECT_EQ(diff.rows_only_a, 4);
  EXPECT_EQ(diff.rows_only_b, 0);
  EXPECT_EQ(diff.set_flips, 0);
  EXPECT_EQ(diff.only_in_b, std::vector<std::string>{"#3"});
  EXPECT_FALSE(diff.identical());

  RoutingFile other_shape = a;
  other_shape.header.top_k = 3;
  expect_error([&] { diff_routing(a, other_shape); }, {"row shapes differ", "top_k 2 vs 3"});
}

// ---- stats --------------------------------------------------------------------------------

TEST_F(RoutingTest, StatsMatchHandComputedValues) {
  RoutingFile file;
  file.header = small_header();
  file.header.num_layers = 2;
  file.header.moe_layers = {0, 1};
  file.header.num_experts = 4;
  file.header.top_k = 2;
  file.header.tp = 2;
  file.header.placement = "round_robin";
  // rows: per token, layer 0 then layer 1: ids (2), weights (2) and a margin.
  auto record = [&](const std::string& id, std::vector<std::vector<int32_t>> ids,
                    std::vector<float> margins) {
    RoutingRecord r;
    r.request_id = id;
    r.num_tokens = static_cast<int64_t>(ids.size()) / 2;
    for (const auto& row : ids) {
      r.expert_ids.insert(r.expert_ids.end(), row.begin(), row.end());
      r.weights.insert(r.weights.end(), {0.6f, 0.4f});
    }
    r.margins = std::move(margins);
    return r;
  };
  // Layer 0 rows: [0,1] [0,2] [1,0]; layer 1 rows: [2,3] [3,2] [2,3].
  file.records.push_back(
      record("r1", {{0, 1}, {2, 3}, {0, 2}, {3, 2}}, {0.5f, 5e-5f, 1e-5f, 0.3f}));
  file.records.push_back(record("r2", {{1, 0}, {2, 3}}, {0.2f, 0.0f}));

  RoutingStatsOptions options;
  options.expert_ranks = placement_from_header(file.header);
  ASSERT_EQ(options.expert_ranks, (std::vector<std::vector<int>>{{0, 1, 0, 1}}));
  options.top_pairs = 5;
  const RoutingStats stats = routing_stats(file, 1e-4, options);

  EXPECT_EQ(stats.num_requests, 2);
  EXPECT_EQ(stats.num_tokens, 3);
  EXPECT_EQ(stats.num_ranks, 2);
  ASSERT_EQ(stats.layers.size(), 2u);
  const LayerRoutingStats& l0 = stats.layers[0];
  const LayerRoutingStats& l1 = stats.layers[1];
  EXPECT_EQ(l0.expert_tokens, (std::vector<int64_t>{3, 2, 1, 0}));
  EXPECT_EQ(l1.expert_tokens, (std::vector<int64_t>{0, 0, 3, 3}));
  EXPECT_DOUBLE_EQ(l0.mean_expert_tokens, 1.5);
  EXPECT_EQ(l0.max_expert_tokens, 3);
  EXPECT_DOUBLE_EQ(l0.expert_balance, 0.5);
  EXPECT_DOUBLE_EQ(l1.expert_balance, 0.5);
  EXPECT_EQ(l0.rank_tokens, (std::vector<int64_t>{4, 2}));  // rank 0 holds experts 0, 2
  EXPECT_DOUBLE_EQ(l0.rank_balance, 0.75);
  EXPECT_EQ(l1.rank_tokens, (std::vector<int64_t>{3, 3}));
  EXPECT_DOUBLE_EQ(l1.rank_balance, 1.0);

  ASSERT_EQ(l0.top_pairs.size(), 2u);
  EXPECT_EQ(l0.top_pairs[0].a, 0);
  EXPECT_EQ(l0.top_pairs[0].b, 1);
  EXPECT_EQ(l0.top_pairs[0].count, 2);
  EXPECT_EQ(l0.top_pairs[1].a, 0);
  EXPECT_EQ(l0.top_pairs[1].b, 2);
  EXPECT_EQ(l0.top_pairs[1].count, 1);
  ASSERT_EQ(l1.top_pairs.size(), 1u);
  EXPECT_EQ(l1.top_pairs[0].count, 3);

  // Margins: layer 0 {0.5, 1e-5, 0.2}, layer 1 {5e-5, 0.3, 0}; epsilon 1e-4.
  EXPECT_EQ(l0.near_ties, 1);
  EXPECT_DOUBLE_EQ(l0.near_tie_rate, 1.0 / 3.0);
  EXPECT_EQ(l1.near_ties, 2);
  EXPECT_DOUBLE_EQ(l1.near_tie_rate, 2.0 / 3.0);
  EXPECT_EQ(stats.near_ties, 3);
  EXPECT_DOUBLE_EQ(stats.near_tie_rate, 0.5);
  // Overall sorted {0, 1e-5, 5e-5, 0.2, 0.3, 0.5}; nearest rank p50 = 3rd value.
  EXPECT_EQ(stats.margins.count, 6);
  EXPECT_EQ(stats.margins.values[0], 0.0);
  EXPECT_EQ(stats.margins.values[4], static_cast<double>(5e-5f));
  EXPECT_EQ(stats.margins.values[8], static_cast<double>(0.5f));
  EXPECT_EQ(l0.margins.values[4], static_cast<double>(0.2f));

  const nlohmann::json json = routing_stats_to_json(stats);
  EXPECT_EQ(json["layers"][0]["top_pairs"][0]["experts"], nlohmann::json({0, 1}));
  EXPECT_EQ(json["layers"][0]["rank_tokens"], nlohmann::json({4, 2}));
  EXPECT_EQ(json["near_ties"], 3);
  EXPECT_NE(render_routing_stats_text(stats).find("near-ties (margin < 0.0001): 3 of 6"),
            std::string::npos);

  options.top_pairs = 1;
  options.expert_ranks = {{0, 1}};
  expect_error([&] { routing_stats(file, 1e-4, options); }, {"placement list 0 has 2 entries"});
  options.expert_ranks.clear();
  const RoutingStats no_ranks = routing_stats(file, 1e-4, options);
  EXPECT_EQ(no_ranks.layers[0].top_pairs.size(), 1u);
  EXPECT_TRUE(no_ranks.layers[0].rank_tokens.empty());
  EXPECT_EQ(no_ranks.num_ranks, 0);
}

// ---- CLI ----------------------------------------------------------------------------------

int run_routes(std::vector<std::string> args, std::string* out = nullptr) {
  args.insert(args.begin(), {"keel", "routes"});
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  const int code = routes_command(static_cast<int>(args.size()), argv.data());
  const std::string stdout_text = ::testing::internal::GetCapturedStdout();
  const std::string stderr_text = ::testing::internal::GetCapturedStderr();
  if (out != nullptr) *out = stdout_text + stderr_text;
  return code;
}

// `keel routes placement FILE`: an explicit placement from the file's routed tokens, one list
// per model layer of num_experts ranks, each rank holding E / tp experts, whose busiest rank
// carries no more tokens than round_robin's (the comment lines say both, per layer).
TEST_F(RoutingTest, CliPlacementFromRoutedTokens) {
  const RoutingFile file = make_file(6, 3);
  const std::string path_a = path("placement.keelrout");
  write_routing_file(path_a, file);
  for (int tp : {2, 4}) {
    std::string out;
    ASSERT_EQ(run_routes({"placement", path_a, "--tp", std::to_string(tp)}, &out), 0) << out;
    EXPECT_NE(out.find("placement: explicit\nexplicit_placement:\n"), std::string::npos) << out;
    std::vector<std::vector<int>> lists;
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("  - [", 0) == 0) {
        std::vector<int> ranks;
        std::istringstream items(line.substr(5));
        for (std::string item; std::getline(items, item, ',');) ranks.push_back(std::stoi(item));
        lists.push_back(ranks);
      }
      if (line.rfind("#   layer ", 0) == 0) {
        const size_t colon = line.find(": ");
        const size_t arrow = line.find(" -> ");
        EXPECT_LE(std::stoll(line.substr(arrow + 4)),
                  std::stoll(line.substr(colon + 2, arrow - colon - 2)))
            << line;
      }
    }
    ASSERT_EQ(lists.size(), 3u) << out;
    for (const std::vector<int>& ranks : lists) {
      ASSERT_EQ(ranks.size(), 8u);
      for (int rank = 0; rank < tp; ++rank)
        EXPECT_EQ(std::count(ranks.begin(), ranks.end(), rank), 8 / tp) << out;
    }
  }
  std::string out;
  EXPECT_EQ(run_routes({"placement"}, &out), 2);
}

TEST_F(RoutingTest, CliDiffStatsReplay) {
  const RoutingFile a = make_file(4, 8);
  RoutingFile b = a;
  {  // one expert-set flip at request 2, token 7, layer 1
    std::vector<int32_t>& ids = b.records[2].expert_ids;
    const size_t base = RoutingRecord::slot_offset(7, 1, 3, 2);
    int32_t replacement = 0;
    while (replacement == ids[base] || replacement == ids[base + 1]) ++replacement;
    ids[base + 1] = replacement;
  }
  const std::string fa = path("a.keelrout");
  const std::string fb = path("b.keelrout");
  write_routing_file(fa, a);
  write_routing_file(fb, b);

  std::string out;
  EXPECT_EQ(run_routes({"diff", fa, fa, "--json"}, &out), 0);
  nlohmann::json json = nlohmann::json::parse(out);
  EXPECT_EQ(json["identical"], true);
  EXPECT_EQ(json["first_divergence"], nullptr);

  const int code = run_routes({"diff", fa, fb, "--json"}, &out);
  EXPECT_EQ(code, 1);
  json = nlohmann::json::parse(out);
  EXPECT_EQ(json["identical"], false);
  EXPECT_EQ(json["set_flips"], 1);
  EXPECT_EQ(json["first_divergence"]["request_id"], "req-2");
  EXPECT_EQ(json["first_divergence"]["position"], 7);
  EXPECT_EQ(json["first_divergence"]["layer"], 1);
  EXPECT_EQ(json["a"], fa);

  EXPECT_EQ(run_routes({"diff", fa, fb}, &out), 1);
  EXPECT_NE(out.find("routing: DIFFERS"), std::string::npos) << out;

  EXPECT_EQ(run_routes({"stats", fa, "--epsilon", "1e-3", "--json"}, &out), 0);
  json = nlohmann::json::parse(out);
  EXPECT_EQ(json["near_tie_epsilon"], 1e-3);
  EXPECT_EQ(json["num_requests"], 4);
  EXPECT_EQ(json["num_ranks"], 4);  // round_robin over tp 4, from the header
  EXPECT_EQ(json["layers"].size(), 3u);

  EXPECT_EQ(run_routes({"stats", fa}, &out), 0);
  EXPECT_NE(out.find("near-ties (margin < 0.0001)"), std::string::npos) << out;

  EXPECT_EQ(run_routes({"replay", fa}, &out), 2);
  EXPECT_NE(out.find("replay is provided by the engine (see keel routes replay --help)"),
            std::string::npos);

  write_bytes(path("junk.keelrout"), "not a routing file at all");
  EXPECT_EQ(run_routes({"stats", path("junk.keelrout")}, &out), 2);
  EXPECT_NE(out.find("bad magic"), std::string::npos) << out;
  EXPECT_EQ(run_routes({"stats", fa, "--bogus"}, &out), 2);
  EXPECT_NE(out.find("unknown flag '--bogus'"), std::string::npos) << out;
  // --flag=value is --flag value; a count that is not a non-negative integer is refused.
  EXPECT_EQ(run_routes({"stats", "--epsilon=0.5", fa, "--json"}, &out), 0);
  EXPECT_EQ(nlohmann::json::parse(out)["near_tie_epsilon"], 0.5);
  EXPECT_EQ(run_routes({"stats", fa, "--top-pairs", "-1"}, &out), 2);
  EXPECT_NE(out.find("--top-pairs: '-1' must be >= 0"), std::string::npos) << out;
  EXPECT_EQ(run_routes({"diff", fa}, &out), 2);
  EXPECT_EQ(run_routes({"frobnicate"}, &out), 2);
  EXPECT_EQ(run_routes({"--help"}, &out), 0);
}

}  // namespace
}  // namespace keel
