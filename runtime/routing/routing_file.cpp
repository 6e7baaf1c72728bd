// Routing file reader and writer (format: routing_file.h).
//
// Design note. Bytes are encoded and decoded explicitly (shifts over uint32 bit patterns), not
// by memcpy of host values, so the format stays little-endian whatever the host is and floats
// keep their exact bits. The reader learns the file size first and checks every length against
// the bytes that remain before it allocates or reads, which is what turns a truncated or corrupt
// file into a precise keel::Error rather than a bad_alloc or a short read noticed too late.
#include "runtime/routing/routing_file.h"
#include "runtime/common/json_depth.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>

#include "kernels/base/check.h"

namespace keel {
namespace {

using json = nlohmann::json;

constexpr uint64_t kFixedHeaderBytes = 16;  // magic + version + header_json_len

void put_u32(std::string& out, uint32_t value) {
  for (int shift = 0; shift < 32; shift += 8) out.push_back(static_cast<char>(value >> shift));
}

uint32_t get_u32(const char* bytes) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) {
    value |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  }
  return value;
}

// Row bytes for one token: per MoE layer, k ids + k weights + 1 margin, 4 bytes each.
uint64_t row_bytes(const RoutingFileHeader& header) {
  return static_cast<uint64_t>(header.num_moe_layers()) *
         (8 * static_cast<uint64_t>(header.top_k) + 4);
}

// JSON text for the file. Invalid UTF-8 in a string (a request id taken from a client, say) is
// replaced rather than failing the whole audit record.
std::string dump_json(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

const json* find_key(const json& object, const char* key) {
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

int64_t get_int(const json& object, const char* key, bool required, const std::string& where) {
  const json* value = find_key(object, key);
  if (value == nullptr) {
    if (required) throw_error(where, ": missing required key \"", key, "\"");
    return 0;
  }
  if (!value->is_number_integer()) {
    throw_error(where, ": \"", key, "\" must be an integer, found ", value->dump());
  }
  if (value->is_number_unsigned() &&
      value->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    throw_error(where, ": \"", key, "\" is out of range: ", value->dump());
  }
  return value->get<int64_t>();
}

double get_number(const json& object, const char* key, double fallback, const std::string& where) {
  const json* value = find_key(object, key);
  if (value == nullptr) return fallback;
  if (!value->is_number()) {
    throw_error(where, ": \"", key, "\" must be a number, found ", value->dump());
  }
  return value->get<double>();
}

std::string get_string(const json& object, const char* key, const std::string& where) {
  const json* value = find_key(object, key);
  if (value == nullptr) return "";
  if (!value->is_string()) {
    throw_error(where, ": \"", key, "\" must be a string, found ", value->dump());
  }
  return value->get<std::string>();
}

std::vector<int32_t> get_int32_array(const json& object, const char* key, bool required,
                                     const std::string& where) {
  const json* value = find_key(object, key);
  if (value == nullptr) {
    if (required) throw_error(where, ": missing required key \"", key, "\"");
    return {};
  }
  if (!value->is_array()) {
    throw_error(where, ": \"", key, "\" must be an array of integers");
  }
  std::vector<int32_t> out;
  out.reserve(value->size());
  for (size_t i = 0; i < value->size(); ++i) {
    const json& item = (*value)[i];
    if (!item.is_number_integer() || item.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
        item.get<int64_t>() > std::numeric_limits<int32_t>::max() ||
        (item.is_number_unsigned() &&
         item.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))) {
      throw_error(where, ": \"", key, "\"[", i, "] must be an int32, found ", item.dump());
    }
    out.push_back(item.get<int32_t>());
  }
  return out;
}

RoutingRecord record_metadata_from_json(const json& object, const std::string& where) {
  if (!object.is_object()) throw_error(where, ": record JSON is not an object");
  RoutingRecord record;
  record.request_id = get_string(object, "request_id", where);
  record.seq_id = get_int(object, "seq_id", false, where);
  record.prompt_token_ids = get_int32_array(object, "prompt_token_ids", false, where);
  record.output_token_ids = get_int32_array(object, "output_token_ids", false, where);
  if (const json* sampling = find_key(object, "sampling")) {
    if (!sampling->is_object()) throw_error(where, ": \"sampling\" must be an object");
    const std::string sampling_where = where + ", sampling";
    record.sampling.temperature = get_number(*sampling, "temperature", 0.0, sampling_where);
    record.sampling.top_p = get_number(*sampling, "top_p", 1.0, sampling_where);
    record.sampling.top_k = get_int(*sampling, "top_k", false, sampling_where);
    if (const json* seed = find_key(*sampling, "seed")) {
      if (!seed->is_number_unsigned() &&
          !(seed->is_number_integer() && seed->get<int64_t>() >= 0)) {
        throw_error(sampling_where, ": \"seed\" must be a non-negative integer, found ",
                    seed->dump());
      }
      record.sampling.seed = seed->get<uint64_t>();
    }
  }
  record.logits_digest = get_string(object, "logits_digest", where);
  record.num_tokens = get_int(object, "num_tokens", true, where);
  if (record.num_tokens < 0) {
    throw_error(where, ": \"num_tokens\" must be >= 0, found ", record.num_tokens);
  }
  return record;
}

std::string printable(const char* bytes, size_t count) {
  std::string out;
  for (size_t i = 0; i < count; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(static_cast<char>(c));
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

}  // namespace

// ---- header -------------------------------------------------------------------------------

void RoutingFileHeader::validate(const std::string& where) const {
  if (num_layers < 0) throw_error(where, ": num_layers must be >= 0, found ", num_layers);
  if (num_experts < 1) throw_error(where, ": num_experts must be >= 1, found ", num_experts);
  if (top_k < 1 || top_k > num_experts) {
    throw_error(where, ": top_k must be in [1, num_experts = ", num_experts, "], found ", top_k);
  }
  std::set<int32_t> seen;
  for (int32_t layer : moe_layers) {
    if (layer < 0 || layer >= num_layers) {
      throw_error(where, ": moe_layers entry ", layer, " outside [0, num_layers = ", num_layers,
                  ")");
    }
    if (!seen.insert(layer).second)
      throw_error(where, ": moe_layers lists layer ", layer, " twice");
  }
  if (!extra.is_object() && !extra.is_null()) throw_error(where, ": extra must be a JSON object");
}

json RoutingFileHeader::to_json() const {
  json out = json::object();
  out["model"] = model;
  out["model_dir"] = model_dir;
  out["architecture"] = architecture;
  out["num_layers"] = num_layers;
  out["moe_layers"] = moe_layers;
  out["num_experts"] = num_experts;
  out["top_k"] = top_k;
  out["tp"] = tp;
  out["placement"] = placement;
  out["reduce"] = reduce;
  out["determinism"] = determinism;
  out["dtype"] = dtype;
  out["combine"] = combine;
  if (!quantization.empty()) out["quantization"] = quantization;
  if (!nvfp4_activations.empty()) out["nvfp4_activations"] = nvfp4_activations;
  if (!kv_cache_dtype.empty()) out["kv_cache_dtype"] = kv_cache_dtype;
  out["git_revision"] = git_revision;
  out["created_unix"] = created_unix;
  out["extra"] = extra.is_null() ? json::object() : extra;
  return out;
}

RoutingFileHeader RoutingFileHeader::from_json(const json& object, const std::string& where) {
  if (!object.is_object()) throw_error(where, ": header JSON is not an object");
  RoutingFileHeader header;
  header.model = get_string(object, "model", where);
  header.model_dir = get_string(object, "model_dir", where);
  header.architecture = get_string(object, "architecture", where);
  header.num_layers = get_int(object, "num_layers", true, where);
  header.moe_layers = get_int32_array(object, "moe_layers", true, where);
  header.num_experts = get_int(object, "num_experts", true, where);
  header.top_k = get_int(object, "top_k", true, where);
  header.tp = get_int(object, "tp", false, where);
  header.placement = get_string(object, "placement", where);
  header.reduce = get_string(object, "reduce", where);
  header.determinism = get_string(object, "determinism", where);
  header.dtype = get_string(object, "dtype", where);
  header.combine = get_string(object, "combine", where);
  header.quantization = get_string(object, "quantization", where);
  header.nvfp4_activations = get_string(object, "nvfp4_activations", where);
  header.kv_cache_dtype = get_string(object, "kv_cache_dtype", where);
  header.git_revision = get_string(object, "git_revision", where);
  header.created_unix = get_int(object, "created_unix", false, where);
  if (const json* extra = find_key(object, "extra")) {
    if (!extra->is_object()) throw_error(where, ": \"extra\" must be an object");
    header.extra = *extra;
  }
  header.validate(where);
  return header;
}

// ---- record -------------------------------------------------------------------------------

void RoutingRecord::validate(const RoutingFileHeader& header, const std::string& where) const {
  if (num_tokens < 0) throw_error(where, ": num_tokens must be >= 0, found ", num_tokens);
  const size_t layers = header.num_moe_layers();
  const size_t slots = static_cast<size_t>(num_tokens) * layers * static_cast<size_t>(header.top_k);
  const size_t margin_count = static_cast<size_t>(num_tokens) * layers;
  if (expert_ids.size() != slots || weights.size() != slots || margins.size() != margin_count) {
    throw_error(where, ": arrays do not match num_tokens = ", num_tokens, " x ", layers,
                " MoE layers x top_k = ", header.top_k, ": expert_ids has ", expert_ids.size(),
                ", weights ", weights.size(), " (want ", slots, "), margins ", margins.size(),
                " (want ", margin_count, ")");
  }
  for (size_t i = 0; i < expert_ids.size(); ++i) {
    if (expert_ids[i] < 0 || expert_ids[i] >= header.num_experts) {
      const size_t k = static_cast<size_t>(header.top_k);
      throw_error(where, ": token ", i / (k * layers), ", layer ",
                  header.moe_layers[(i / k) % layers], ", slot ", i % k, ": expert id ",
                  expert_ids[i], " outside [0, ", header.num_experts, ")");
    }
  }
}

json RoutingRecord::metadata_json() const {
  json out = json::object();
  out["request_id"] = request_id;
  out["seq_id"] = seq_id;
  out["prompt_token_ids"] = prompt_token_ids;
  out["output_token_ids"] = output_token_ids;
  out["sampling"] = {{"temperature", sampling.temperature},
                     {"top_p", sampling.top_p},
                     {"top_k", sampling.top_k},
                     {"seed", sampling.seed}};
  out["logits_digest"] = logits_digest;
  out["num_tokens"] = num_tokens;
  return out;
}

// ---- writer -------------------------------------------------------------------------------

RoutingWriter::RoutingWriter(const std::string& path, const RoutingFileHeader& header)
    : path_(path), header_(header) {
  header_.validate("routing file '" + path_ + "': header");
  out_.open(path_, std::ios::binary | std::ios::trunc);
  if (!out_) throw_error("routing file '", path_, "': cannot open for writing");
  const std::string header_json = dump_json(header_.to_json());
  std::string bytes(kRoutingMagic, sizeof(kRoutingMagic));
  put_u32(bytes, kRoutingFormatVersion);
  put_u32(bytes, static_cast<uint32_t>(header_json.size()));
  bytes += header_json;
  write_bytes(bytes, "header");
}

RoutingWriter::~RoutingWriter() {
  // Destructors must not throw; a caller that needs to know calls close() first.
  if (out_.is_open()) out_.close();
}

void RoutingWriter::write_bytes(const std::string& bytes, const char* what) {
  if (!out_.is_open()) throw_error("routing file '", path_, "': write after close");
  out_.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out_) throw_error("routing file '", path_, "': writing the ", what, " failed");
}

void RoutingWriter::append(const RoutingRecord& record) {
  const std::string where =
      "routing file '" + path_ + "': record " + std::to_string(records_written_);
  record.validate(header_, where);
  const std::string metadata = dump_json(record.metadata_json());
  if (metadata.size() > std::numeric_limits<uint32_t>::max()) {
    throw_error(where, ": record JSON of ", metadata.size(), " bytes exceeds 4 GiB");
  }
  std::string bytes;
  bytes.reserve(4 + metadata.size() + static_cast<size_t>(record.num_tokens * row_bytes(header_)));
  put_u32(bytes, static_cast<uint32_t>(metadata.size()));
  bytes += metadata;
  const size_t layers = header_.num_moe_layers();
  const auto k = static_cast<size_t>(header_.top_k);
  for (int64_t t = 0; t < record.num_tokens; ++t) {
    for (size_t l = 0; l < layers; ++l) {
      const size_t base = RoutingRecord::slot_offset(t, l, layers, header_.top_k);
      for (size_t s = 0; s < k; ++s)
        put_u32(bytes, static_cast<uint32_t>(record.expert_ids[base + s]));
      for (size_t s = 0; s < k; ++s)
        put_u32(bytes, std::bit_cast<uint32_t>(record.weights[base + s]));
      put_u32(bytes,
              std::bit_cast<uint32_t>(record.margins[RoutingRecord::margin_offset(t, l, layers)]));
    }
  }
  write_bytes(bytes, "record");
  ++records_written_;
}

void RoutingWriter::flush() {
  if (!out_.is_open()) return;
  out_.flush();
  if (!out_) throw_error("routing file '", path_, "': flush failed");
}

void RoutingWriter::close() {
  if (!out_.is_open()) return;
  out_.flush();
  const bool ok = static_cast<bool>(out_);
  out_.close();
  if (!ok || out_.fail()) throw_error("routing file '", path_, "': closing failed");
}

// ---- reader -------------------------------------------------------------------------------

RoutingReader::RoutingReader(const std::string& path) : path_(path) {
  in_.open(path_, std::ios::binary);
  if (!in_) throw_error("routing file '", path_, "': cannot open for reading");
  in_.seekg(0, std::ios::end);
  file_size_ = static_cast<uint64_t>(in_.tellg());
  in_.seekg(0, std::ios::beg);
  const std::string where = "routing file '" + path_ + "'";
  if (file_size_ < kFixedHeaderBytes) {
    throw_error(where, ": truncated: ", file_size_, " bytes, the fixed header alone needs ",
                kFixedHeaderBytes, " (magic, version, header length)");
  }
  char fixed[kFixedHeaderBytes];
  in_.read(fixed, kFixedHeaderBytes);
  if (!in_) throw_error(where, ": reading the fixed header failed");
  if (std::memcmp(fixed, kRoutingMagic, sizeof(kRoutingMagic)) != 0) {
    throw_error(where, ": bad magic: expected \"KEELROUT\", found \"", printable(fixed, 8),
                "\" (not a keel routing file)");
  }
  const uint32_t version = get_u32(fixed + 8);
  if (version != kRoutingFormatVersion) {
    throw_error(where, ": unsupported version ", version, " (this reader reads version ",
                kRoutingFormatVersion, ")");
  }
  const uint64_t header_len = get_u32(fixed + 12);
  if (header_len > file_size_ - kFixedHeaderBytes) {
    throw_error(where, ": header JSON length ", header_len, " runs past the end of the file (",
                file_size_ - kFixedHeaderBytes, " bytes remain): truncated or corrupt");
  }
  std::string text(header_len, '\0');
  in_.read(text.data(), static_cast<std::streamsize>(header_len));
  if (!in_) throw_error(where, ": reading the header JSON failed");
  check_json_depth(text, where + " header");
  json object;
  try {
    object = json::parse(text);
  } catch (const json::exception& error) {
    throw_error(where, ": header JSON does not parse: ", error.what());
  }
  try {
    header_ = RoutingFileHeader::from_json(object, where + ": header");
  } catch (const json::exception& error) {
    throw_error(where, ": header: ", error.what());
  }
  offset_ = kFixedHeaderBytes + header_len;
}

void RoutingReader::fail_record(uint64_t offset, const std::string& what) const {
  throw_error("routing file '", path_, "': record ", records_read_, " (byte offset ", offset,
              "): ", what);
}

bool RoutingReader::next(RoutingRecord& record) {
  if (offset_ == file_size_) return false;
  const uint64_t start = offset_;
  uint64_t remaining = file_size_ - offset_;
  if (remaining < 4) {
    fail_record(start, "truncated: " + std::to_string(remaining) +
                           " bytes where a 4-byte record length was expected");
  }
  char length_bytes[4];
  in_.read(length_bytes, 4);
  if (!in_) fail_record(start, "reading the record length failed");
  const uint64_t json_len = get_u32(length_bytes);
  remaining -= 4;
  if (json_len > remaining) {
    fail_record(start, "record JSON length " + std::to_string(json_len) +
                           " runs past the end of the file (" + std::to_string(remaining) +
                           " bytes remain): truncated or corrupt");
  }
  std::string text(json_len, '\0');
  in_.read(text.data(), static_cast<std::streamsize>(json_len));
  if (!in_) fail_record(start, "reading the record JSON failed");
  remaining -= json_len;
  if (json_nesting_depth(text) > kMaxJsonDepth)
    fail_record(start,
                "record JSON nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  json object;
  try {
    object = json::parse(text);
  } catch (const json::exception& error) {
    fail_record(start, std::string("record JSON does not parse: ") + error.what());
  }
  std::ostringstream where_stream;
  where_stream << "routing file '" << path_ << "': record " << records_read_ << " (byte offset "
               << start << ")";
  const std::string where = where_stream.str();
  RoutingRecord parsed;
  try {
    parsed = record_metadata_from_json(object, where);
  } catch (const json::exception& error) {
    fail_record(start, error.what());
  }
  const uint64_t per_row = row_bytes(header_);
  const auto rows = static_cast<uint64_t>(parsed.num_tokens);
  // Divide rather than multiply: a corrupt num_tokens must not overflow the check.
  if (per_row > 0 && rows > remaining / per_row) {
    fail_record(start, "rows missing: num_tokens = " + std::to_string(rows) + " needs " +
                           std::to_string(rows) + " x " + std::to_string(per_row) +
                           " bytes of rows, only " + std::to_string(remaining) +
                           " bytes remain (truncated file?)");
  }
  std::string row_data(rows * per_row, '\0');
  in_.read(row_data.data(), static_cast<std::streamsize>(row_data.size()));
  if (!in_) fail_record(start, "reading the rows failed");

  const size_t layers = header_.num_moe_layers();
  const auto k = static_cast<size_t>(header_.top_k);
  parsed.expert_ids.resize(rows * layers * k);
  parsed.weights.resize(rows * layers * k);
  parsed.margins.resize(rows * layers);
  const char* cursor = row_data.data();
  for (uint64_t t = 0; t < rows; ++t) {
    for (size_t l = 0; l < layers; ++l) {
      const size_t base =
          RoutingRecord::slot_offset(static_cast<int64_t>(t), l, layers, header_.top_k);
      for (size_t s = 0; s < k; ++s, cursor += 4) {
        const auto id = static_cast<int32_t>(get_u32(cursor));
        if (id < 0 || id >= header_.num_experts) {
          fail_record(start, "token " + std::to_string(t) + ", layer " +
                                 std::to_string(header_.moe_layers[l]) + ", slot " +
                                 std::to_string(s) + ": expert id " + std::to_string(id) +
                                 " outside [0, " + std::to_string(header_.num_experts) + ")");
        }
        parsed.expert_ids[base + s] = id;
      }
      for (size_t s = 0; s < k; ++s, cursor += 4) {
        parsed.weights[base + s] = std::bit_cast<float>(get_u32(cursor));
      }
      parsed.margins[RoutingRecord::margin_offset(static_cast<int64_t>(t), l, layers)] =
          std::bit_cast<float>(get_u32(cursor));
      cursor += 4;
    }
  }
  offset_ += 4 + json_len + row_data.size();
  ++records_read_;
  record = std::move(parsed);
  return true;
}

// ---- whole files --------------------------------------------------------------------------

RoutingFile read_routing_file(const std::string& path) {
  RoutingReader reader(path);
  RoutingFile file;
  file.path = path;
  file.header = reader.header();
  RoutingRecord record;
  while (reader.next(record)) file.records.push_back(std::move(record));
  return file;
}

void write_routing_file(const std::string& path, const RoutingFile& file) {
  RoutingWriter writer(path, file.header);
  for (const RoutingRecord& record : file.records) writer.append(record);
  writer.close();
}

}  // namespace keel
