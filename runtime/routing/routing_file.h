// Routing records: which experts every token of every request was routed to, as audit and
// replay files.
//
// Design note. A router picks top-k experts from continuous scores; at a near-tie a last-bit
// change flips the choice and the continuation diverges. To explain such a divergence after the
// fact (audit) or to force a run down a recorded path (replay) the decisions themselves must be
// kept, together with how close each one was (the margin). The file is a public, stable format
// read by tools that do not have the model, so it is self-describing (a JSON header naming the
// model and its shape), streamable (records are appended one request at a time and read back one
// at a time, no index or footer to rewrite) and cheap to parse (the per-token rows are fixed-size
// binary; only per-request metadata is JSON). Every length is checked against the bytes that
// remain before anything is allocated, so a corrupt file gives an error naming the file, the
// record and what is wrong instead of a crash or a huge allocation.
//
// ---------------------------------------------------------------------------------------------
// File format, version 1. All integers and floats are little-endian; floats are IEEE-754
// binary32 stored bit-exactly (NaN payloads and signed zeros survive a round trip).
//
//   offset 0   8 bytes   magic "KEELROUT" (ASCII, no terminator)
//   offset 8   uint32    version = 1
//   offset 12  uint32    header_json_len (bytes)
//   offset 16  header_json_len bytes of UTF-8 JSON (the header object, below)
//   then zero or more request records, back to back, until end of file:
//     uint32   record_json_len (bytes)
//     record_json_len bytes of UTF-8 JSON (the record object, below)
//     num_tokens rows; row t (t = 0 .. num_tokens-1) is the token at absolute position t of the
//     request's sequence and holds, for each MoE layer in the order of header "moe_layers":
//       top_k x int32    expert ids, in router slot order (slot 0 = highest score)
//       top_k x float32  combine weights, same slot order
//       1 x float32      margin: the k-th minus the (k+1)-th router probability (how far the
//                        last chosen expert was from being displaced; +inf or anything the
//                        writer chose when top_k == num_experts)
//     so a row is L * (8 * top_k + 4) bytes with L = len(moe_layers).
//   The file ends exactly after the last record's rows; a partial length prefix, JSON or row
//   block is an error (a truncated file), never silently ignored.
//
// Header JSON object (keys in any order; readers ignore unknown keys, so writers of version 1
// must put additions under "extra"):
//   "model"         string   model name
//   "model_dir"     string   checkpoint directory the run used
//   "architecture"  string   e.g. "qwen3_moe", "mixtral"
//   "num_layers"    int      decoder layers of the model (required, >= 0)
//   "moe_layers"    [int]    model layer indices that route, in row order (required; distinct,
//                            each in [0, num_layers))
//   "num_experts"   int      routed experts per MoE layer (required, >= 1)
//   "top_k"         int      experts chosen per token and layer (required, 1..num_experts)
//   "tp"            int      tensor-parallel ranks of the run
//   "placement"     string   expert placement kind ("contiguous", "round_robin", "explicit")
//   "reduce"        string   "fixed_order" or "native"
//   "determinism"   string   e.g. "batch_invariant", "fast"
//   "dtype"         string   weight dtype, e.g. "bf16"
//   "combine"       string   expert combine mode, e.g. "fp32"
//   "git_revision"  string   keel revision that wrote the file
//   "created_unix"  int      seconds since the Unix epoch
//   "extra"         object   free-form additions (optional)
// Missing optional strings read as "", missing optional ints as 0.
//
// Record JSON object:
//   "request_id"        string   (may be ""; used to pair requests across files)
//   "seq_id"            int      engine sequence id
//   "prompt_token_ids"  [int]
//   "output_token_ids"  [int]    may be empty
//   "sampling"          object   {"temperature": number, "top_p": number, "top_k": int,
//                                 "seed": uint64}
//   "logits_digest"     string   lowercase hex SHA-256 of the fp32 logits rows the sampler saw,
//                                or "" when not computed
//   "num_tokens"        int      T, the rows that follow: tokens whose forward ran, typically
//                                len(prompt) + len(output) - 1 (the last sampled token is never
//                                fed back); the format stores what the writer gives
// Readers reject expert ids outside [0, num_experts).
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel {

inline constexpr char kRoutingMagic[8] = {'K', 'E', 'E', 'L', 'R', 'O', 'U', 'T'};
inline constexpr uint32_t kRoutingFormatVersion = 1;

struct RoutingFileHeader {
  std::string model;
  std::string model_dir;
  std::string architecture;
  int64_t num_layers = 0;
  std::vector<int32_t> moe_layers;  // model layer indices, in row order
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t tp = 1;
  std::string placement;
  std::string reduce;
  std::string determinism;
  std::string dtype;
  std::string combine;
  // What else decides the bits (absent in files written before they were recorded: replay then
  // uses its defaults): the checkpoint's quantization method ("none", "modelopt", ...), the
  // NVFP4 activation numerics ("fp32" | "w4a4") and the KV cache's storage dtype as resolved.
  std::string quantization;
  std::string nvfp4_activations;
  std::string kv_cache_dtype;
  std::string git_revision;
  int64_t created_unix = 0;
  nlohmann::json extra = nlohmann::json::object();

  size_t num_moe_layers() const { return moe_layers.size(); }
  // Throws keel::Error naming the first inconsistent field (`where` prefixes the message).
  void validate(const std::string& where) const;
  nlohmann::json to_json() const;
  // Throws keel::Error (prefixed by `where`) on a missing required key or a wrong type.
  static RoutingFileHeader from_json(const nlohmann::json& json, const std::string& where);
};

struct RoutingSampling {
  double temperature = 0.0;
  double top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
};

// One request. Row t of the three arrays is the token at absolute position t; within a row the
// MoE layers follow header.moe_layers and slots follow router order.
struct RoutingRecord {
  std::string request_id;
  int64_t seq_id = 0;
  std::vector<int32_t> prompt_token_ids;
  std::vector<int32_t> output_token_ids;
  RoutingSampling sampling;
  std::string logits_digest;        // hex SHA-256 or ""
  int64_t num_tokens = 0;           // T
  std::vector<int32_t> expert_ids;  // [T][L][k]
  std::vector<float> weights;       // [T][L][k]
  std::vector<float> margins;       // [T][L]

  // Element offsets for row t, MoE layer slot l (l indexes header.moe_layers).
  static size_t slot_offset(int64_t t, size_t l, size_t num_moe_layers, int64_t top_k) {
    return (static_cast<size_t>(t) * num_moe_layers + l) * static_cast<size_t>(top_k);
  }
  static size_t margin_offset(int64_t t, size_t l, size_t num_moe_layers) {
    return static_cast<size_t>(t) * num_moe_layers + l;
  }
  // Throws keel::Error (prefixed by `where`) when the arrays do not hold num_tokens rows of the
  // header's shape or an expert id is out of range.
  void validate(const RoutingFileHeader& header, const std::string& where) const;
  // The JSON part of the record (everything but the rows).
  nlohmann::json metadata_json() const;
};

// A whole file in memory: what the analyses take.
struct RoutingFile {
  std::string path;  // for messages; "" when built in memory
  RoutingFileHeader header;
  std::vector<RoutingRecord> records;
};

// Single writer (thread-compatible: one thread at a time). The constructor creates (truncates)
// `path` and writes the header; append() writes one record; flush() pushes buffered bytes to the
// OS so a crash loses at most the records appended since. close() flushes and reports errors;
// the destructor closes without throwing. Every failure is a keel::Error naming the file.
class RoutingWriter {
 public:
  RoutingWriter(const std::string& path, const RoutingFileHeader& header);
  ~RoutingWriter();
  RoutingWriter(const RoutingWriter&) = delete;
  RoutingWriter& operator=(const RoutingWriter&) = delete;

  // Validates the record against the header first, so a bad record never reaches the file.
  void append(const RoutingRecord& record);
  void flush();
  void close();

  const RoutingFileHeader& header() const { return header_; }
  int64_t records_written() const { return records_written_; }
  const std::string& path() const { return path_; }

 private:
  void write_bytes(const std::string& bytes, const char* what);

  std::string path_;
  RoutingFileHeader header_;
  std::ofstream out_;
  int64_t records_written_ = 0;
};

// Streaming reader. The constructor opens the file and reads and validates the header; next()
// reads one record, returning false at a clean end of file (exactly after a record). Corrupt or
// truncated input throws keel::Error: "routing file 'P': record N (byte offset O): <what>".
class RoutingReader {
 public:
  explicit RoutingReader(const std::string& path);

  const RoutingFileHeader& header() const { return header_; }
  bool next(RoutingRecord& record);
  int64_t records_read() const { return records_read_; }
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] void fail_record(uint64_t offset, const std::string& what) const;

  std::string path_;
  std::ifstream in_;
  uint64_t file_size_ = 0;
  uint64_t offset_ = 0;
  RoutingFileHeader header_;
  int64_t records_read_ = 0;
};

// Whole-file helpers over the writer and reader.
RoutingFile read_routing_file(const std::string& path);
void write_routing_file(const std::string& path, const RoutingFile& file);

}  // namespace keel
