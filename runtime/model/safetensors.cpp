// safetensors reader and writer.
//
// Format (https://github.com/huggingface/safetensors, "Format" section):
//   bytes [0, 8)        header length N, unsigned 64-bit little-endian
//   bytes [8, 8 + N)    UTF-8 JSON object: {"__metadata__": {str: str},
//                       "<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...}
//   bytes [8 + N, end)  data region; each tensor occupies [b, e) relative to its start,
//                       row-major, little-endian.
//
// Reading: the whole file is mapped read-only (MAP_PRIVATE) and the mapping lives as long as
// the SafetensorsFile, so TensorView::data points straight into it (zero copy). Everything is
// validated before open() returns, so a consumer never sees a view that reaches past the file:
//   - file at least 8 bytes; 0 < N <= 100 MB (the reference implementation's limit) and the
//     header fits in the file;
//   - header is a JSON object; __metadata__, when present, maps strings to strings;
//   - each tensor has dtype (F32, BF16, F16, or for quantized checkpoints U8, I8, I32,
//     F8_E4M3, F8_E8M0), shape (non-negative integers) and
//     data_offsets ([begin, end], begin <= end, end within the data region);
//   - end - begin == product(shape) * dtype size (with overflow checks);
//   - no two tensors' byte ranges overlap (gaps are tolerated, as they are harmless).
// Every failure throws keel::Error naming the file and, where there is one, the tensor.
//
// Alignment: the data region starts at 8 + N. Writers pad N to a multiple of 8 (ours and the
// Python library do), but the format does not require it, so for foreign files TensorView::data
// may be misaligned for its element type. Consumers copy or convert element by element with
// memcpy loads (TensorView::f32_at, HostWeight's row copies), never dereference it as
// float*/uint16_t* directly, so this is accepted rather than rejected.
//
// Writing: header padded with spaces to a multiple of 8 bytes, tensors laid out back to back
// in the given order. The file is written under a temporary name in the same directory and
// renamed over the final name, so a crash never leaves a half-written file under that name.

#include "runtime/model/safetensors.h"
#include "runtime/common/json_depth.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "kernels/base/check.h"

namespace keel {

namespace {

// The reference implementation refuses headers above 100 MB; a real header for a model with
// tens of thousands of tensors is a few MB, so anything larger is corruption.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr size_t kHeaderLengthBytes = 8;
constexpr const char* kMetadataKey = "__metadata__";

std::string errno_text(int error_number) {
  return std::strerror(error_number);
}

// Owns a POSIX file descriptor; closes it on every exit path.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }
  // Closes now and reports failure (close can surface delayed write errors).
  int close_checked() {
    int result = ::close(fd_);
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// A JSON value as it appeared, shortened so a garbage header cannot flood the message.
std::string json_excerpt(const nlohmann::json& value) {
  constexpr size_t kMaxChars = 80;
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > kMaxChars) text = text.substr(0, kMaxChars) + "...";
  return text;
}

constexpr TensorType kAllTensorTypes[] = {TensorType::kF32,    TensorType::kBF16,  TensorType::kF16,
                                          TensorType::kU8,     TensorType::kI8,    TensorType::kI32,
                                          TensorType::kF8E4M3, TensorType::kF8E8M0};

std::optional<TensorType> parse_tensor_type(const std::string& name) {
  for (TensorType type : kAllTensorTypes) {
    if (tensor_type_name(type) == name) return type;
  }
  return std::nullopt;
}

// Product of dims times the element size, or nullopt on int64 overflow.
std::optional<uint64_t> byte_size(const std::vector<int64_t>& shape, TensorType type) {
  uint64_t total = tensor_type_size(type);
  for (int64_t dim : shape) {
    uint64_t product = 0;
    if (__builtin_mul_overflow(total, static_cast<uint64_t>(dim), &product)) return std::nullopt;
    total = product;
  }
  if (total > static_cast<uint64_t>(INT64_MAX)) return std::nullopt;
  return total;
}

struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  const std::string* name = nullptr;
};

}  // namespace

std::string_view tensor_type_name(TensorType type) {
  switch (type) {
    case TensorType::kF32:
      return "F32";
    case TensorType::kBF16:
      return "BF16";
    case TensorType::kF16:
      return "F16";
    case TensorType::kU8:
      return "U8";
    case TensorType::kI8:
      return "I8";
    case TensorType::kI32:
      return "I32";
    case TensorType::kF8E4M3:
      return "F8_E4M3";
    case TensorType::kF8E8M0:
      return "F8_E8M0";
  }
  return "?";
}

size_t tensor_type_size(TensorType type) {
  switch (type) {
    case TensorType::kF32:
    case TensorType::kI32:
      return 4;
    case TensorType::kBF16:
    case TensorType::kF16:
      return 2;
    default:
      return 1;
  }
}

TensorType tensor_type_of(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return TensorType::kBF16;
    case DType::kF16:
      return TensorType::kF16;
    default:
      return TensorType::kF32;
  }
}

int64_t TensorView::num_elements() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

std::string TensorView::shape_string() const {
  return shape_to_string(shape);
}

float TensorView::f32_at(size_t index) const {
  if (!is_float())
    throw_error("tensor ", name, " in ", file, " is ", tensor_type_name(type),
                " where a float tensor (F32, BF16, F16) is expected");
  const size_t element_bytes = dtype_size(dtype);
  KEEL_CHECK(index < nbytes / element_bytes, "tensor ", name, " in ", file, ": element ", index,
             " is past its ", nbytes / element_bytes, " elements");
  // An aligned copy of the one element, then the ordinary conversion on it.
  alignas(4) std::byte element[4];
  std::memcpy(element, data + index * element_bytes, element_bytes);
  return load_as_f32(element, dtype, 0);
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const std::string where = "safetensors file " + path;

  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw_error("cannot open ", where, ": ", errno_text(errno));
  struct stat file_status {};
  if (::fstat(fd.get(), &file_status) != 0)
    throw_error("cannot stat ", where, ": ", errno_text(errno));
  if (!S_ISREG(file_status.st_mode)) throw_error(where, ": not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(file_status.st_size);
  if (file_size < kHeaderLengthBytes) {
    throw_error(where, ": file is ", file_size, " bytes, shorter than the ", kHeaderLengthBytes,
                "-byte header length field (truncated or not a safetensors file)");
  }

  // The constructor is private (instances only come from open()), so make_unique cannot be
  // used; ownership is taken immediately.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  void* mapping = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (mapping == MAP_FAILED) throw_error("cannot mmap ", where, ": ", errno_text(errno));
  // From here on the destructor unmaps, including when validation below throws.
  file->mapping_ = mapping;
  file->mapping_size_ = file_size;
  const auto* bytes = static_cast<const std::byte*>(mapping);

  uint64_t header_length = 0;
  for (size_t i = 0; i < kHeaderLengthBytes; ++i) {
    header_length |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  }
  if (header_length == 0) throw_error(where, ": header length is 0 (expected a JSON object)");
  if (header_length > kMaxHeaderBytes) {
    throw_error(where, ": header length ", header_length, " bytes exceeds the ", kMaxHeaderBytes,
                "-byte limit (corrupt header length?)");
  }
  if (header_length > file_size - kHeaderLengthBytes) {
    throw_error(where, ": header length ", header_length,
                " bytes runs past the end of the file: ", "file is ", file_size,
                " bytes, header would end at ", kHeaderLengthBytes + header_length);
  }

  const char* header_begin = reinterpret_cast<const char*>(bytes + kHeaderLengthBytes);
  check_json_depth(std::string_view(header_begin, header_length), where + " header");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_length);
  } catch (const nlohmann::json::exception& error) {
    throw_error(where, ": header is not valid JSON: ", error.what());
  }
  if (!header.is_object()) {
    throw_error(where, ": header must be a JSON object, found ", header.type_name());
  }

  const uint64_t data_offset = kHeaderLengthBytes + header_length;
  const uint64_t data_size = file_size - data_offset;
  const std::byte* data_region = bytes + data_offset;
  std::vector<ByteRange> ranges;

  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        throw_error(where, ": __metadata__ must be an object of strings, found ",
                    entry.type_name());
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          throw_error(where, ": __metadata__ entry \"", key, "\" must be a string, found ",
                      value.type_name(), " ", json_excerpt(value));
        }
        file->metadata_[key] = value.get<std::string>();
      }
      continue;
    }

    const std::string tensor_where = where + ", tensor " + name;
    if (!entry.is_object()) {
      throw_error(tensor_where, ": entry must be a JSON object, found ", entry.type_name());
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) {
        throw_error(tensor_where, ": missing \"", field,
                    "\" (expected dtype, shape, data_offsets)");
      }
    }

    const nlohmann::json& dtype_json = entry["dtype"];
    if (!dtype_json.is_string()) {
      throw_error(tensor_where, ": dtype must be a string, found ", dtype_json.type_name(), " ",
                  json_excerpt(dtype_json));
    }
    const std::string dtype_text = dtype_json.get<std::string>();
    std::optional<TensorType> dtype = parse_tensor_type(dtype_text);
    if (!dtype) {
      throw_error(tensor_where, ": dtype ", dtype_text,
                  " is not supported (supported: F32, BF16, F16, U8, I8, I32, F8_E4M3, F8_E8M0)");
    }

    const nlohmann::json& shape_json = entry["shape"];
    if (!shape_json.is_array()) {
      throw_error(tensor_where, ": shape must be an array of integers, found ",
                  shape_json.type_name(), " ", json_excerpt(shape_json));
    }
    std::vector<int64_t> shape;
    for (size_t axis = 0; axis < shape_json.size(); ++axis) {
      const nlohmann::json& dim = shape_json[axis];
      if (dim.is_number_unsigned()) {
        uint64_t value = dim.get<uint64_t>();
        if (value > static_cast<uint64_t>(INT64_MAX)) {
          throw_error(tensor_where, ": shape[", axis, "] = ", value, " is too large");
        }
        shape.push_back(static_cast<int64_t>(value));
      } else if (dim.is_number_integer()) {
        // Signed and not unsigned: negative.
        throw_error(tensor_where, ": shape ", json_excerpt(shape_json), " has negative dimension ",
                    dim.get<int64_t>(), " at axis ", axis, " (expected >= 0)");
      } else {
        throw_error(tensor_where, ": shape must be an array of integers, found ",
                    json_excerpt(shape_json));
      }
    }

    const nlohmann::json& offsets_json = entry["data_offsets"];
    if (!offsets_json.is_array() || offsets_json.size() != 2 ||
        !offsets_json[0].is_number_unsigned() || !offsets_json[1].is_number_unsigned()) {
      throw_error(tensor_where,
                  ": data_offsets must be [begin, end] with non-negative integers, found ",
                  json_excerpt(offsets_json));
    }
    const uint64_t begin = offsets_json[0].get<uint64_t>();
    const uint64_t end = offsets_json[1].get<uint64_t>();
    if (begin > end) {
      throw_error(tensor_where, ": data_offsets [", begin, ", ", end,
                  "] are reversed (expected begin <= end)");
    }
    if (end > data_size) {
      throw_error(tensor_where, ": data_offsets [", begin, ", ", end,
                  "] point outside the file: data region is ", data_size, " bytes, tensor ends at ",
                  end);
    }

    std::optional<uint64_t> expected_bytes = byte_size(shape, *dtype);
    if (!expected_bytes) {
      throw_error(tensor_where, ": shape ", shape_to_string(shape), " x ", dtype_text,
                  " overflows 64-bit byte counts");
    }
    if (*expected_bytes != end - begin) {
      throw_error(tensor_where, ": shape ", shape_to_string(shape), " x ", dtype_text, " (",
                  tensor_type_size(*dtype), " bytes) needs ", *expected_bytes,
                  " bytes, but data_offsets [", begin, ", ", end, "] span ", end - begin, " bytes");
    }

    TensorView view;
    view.name = name;
    view.file = path;
    view.type = *dtype;
    if (view.is_float())
      view.dtype = *dtype == TensorType::kF32    ? DType::kF32
                   : *dtype == TensorType::kBF16 ? DType::kBF16
                                                 : DType::kF16;
    view.shape = std::move(shape);
    view.data = data_region + begin;
    view.nbytes = static_cast<size_t>(end - begin);
    auto inserted = file->tensors_.emplace(name, std::move(view));
    ranges.push_back({begin, end, &inserted.first->first});
  }

  // Overlap check: after sorting by begin, a range overlaps an earlier one exactly when it
  // starts before the furthest end seen so far. Empty ranges occupy no bytes and are skipped.
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const ByteRange* furthest = nullptr;
  for (const ByteRange& range : ranges) {
    if (range.begin == range.end) continue;
    if (furthest && range.begin < furthest->end) {
      throw_error(where, ": tensors ", *furthest->name, " and ", *range.name, " overlap: tensor ",
                  *furthest->name, " spans [", furthest->begin, ", ", furthest->end, "), tensor ",
                  *range.name, " spans [", range.begin, ", ", range.end, ")");
    }
    if (!furthest || range.end > furthest->end) furthest = &range;
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_) ::munmap(mapping_, mapping_size_);
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

namespace {

// Deletes the temporary file unless the write committed (renamed it into place).
class TemporaryFileGuard {
 public:
  explicit TemporaryFileGuard(std::string path) : path_(std::move(path)) {}
  ~TemporaryFileGuard() {
    if (!committed_) ::unlink(path_.c_str());
  }
  TemporaryFileGuard(const TemporaryFileGuard&) = delete;
  TemporaryFileGuard& operator=(const TemporaryFileGuard&) = delete;
  void commit() { committed_ = true; }

 private:
  std::string path_;
  bool committed_ = false;
};

void write_all(int fd, const void* data, size_t size, const std::string& temp_path,
               const std::string& final_path) {
  const auto* cursor = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t written = ::write(fd, cursor, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      throw_error("writing safetensors file ", final_path, " (via ", temp_path,
                  "): ", errno_text(errno));
    }
    cursor += written;
    size -= static_cast<size_t>(written);
  }
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string where = "writing safetensors file " + path;

  // ordered_json keeps the header in the order tensors are given, which is also data order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json metadata_json = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) metadata_json[key] = value;
    header[kMetadataKey] = std::move(metadata_json);
  }
  std::set<std::string> seen_names;
  uint64_t offset = 0;
  for (const TensorToWrite& tensor : tensors) {
    const std::string tensor_where = where + ", tensor " + tensor.name;
    if (tensor.name.empty()) throw_error(where, ": tensor names must not be empty");
    if (tensor.name == kMetadataKey) throw_error(tensor_where, ": name is reserved");
    if (!seen_names.insert(tensor.name).second) throw_error(tensor_where, ": duplicate name");
    for (size_t axis = 0; axis < tensor.shape.size(); ++axis) {
      if (tensor.shape[axis] < 0) {
        throw_error(tensor_where, ": shape ", shape_to_string(tensor.shape),
                    " has negative dimension at axis ", axis);
      }
    }
    const TensorType stored = tensor.stored_type();
    std::optional<uint64_t> expected_bytes = byte_size(tensor.shape, stored);
    if (!expected_bytes || *expected_bytes != tensor.bytes.size()) {
      throw_error(tensor_where, ": shape ", shape_to_string(tensor.shape), " x ",
                  tensor_type_name(stored), " needs ",
                  expected_bytes ? std::to_string(*expected_bytes) : std::string("overflowing"),
                  " bytes, but ", tensor.bytes.size(), " bytes were given");
    }
    header[tensor.name] = {{"dtype", std::string(tensor_type_name(stored))},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.bytes.size()}}};
    offset += tensor.bytes.size();
  }

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& error) {
    throw_error(where,
                ": cannot encode header (tensor names and metadata must be UTF-8): ", error.what());
  }
  // Pad so the data region starts 8-byte aligned, as the Python library does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  unsigned char length_field[kHeaderLengthBytes];
  for (size_t i = 0; i < kHeaderLengthBytes; ++i) {
    length_field[i] = static_cast<unsigned char>(uint64_t{header_text.size()} >> (8 * i));
  }

  // Unique per process and call so concurrent writers never share a temporary file.
  static std::atomic<uint64_t> write_counter{0};
  const std::string temp_path = path + ".tmp." + std::to_string(::getpid()) + "." +
                                std::to_string(write_counter.fetch_add(1));
  FileDescriptor fd(::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd.get() < 0) {
    throw_error(where, ": cannot create temporary file ", temp_path, ": ", errno_text(errno));
  }
  TemporaryFileGuard guard(temp_path);
  write_all(fd.get(), length_field, sizeof(length_field), temp_path, path);
  write_all(fd.get(), header_text.data(), header_text.size(), temp_path, path);
  for (const TensorToWrite& tensor : tensors) {
    write_all(fd.get(), tensor.bytes.data(), tensor.bytes.size(), temp_path, path);
  }
  if (fd.close_checked() != 0) {
    throw_error(where, ": closing temporary file ", temp_path, ": ", errno_text(errno));
  }
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    throw_error(where, ": renaming ", temp_path, " into place: ", errno_text(errno));
  }
  guard.commit();
}

}  // namespace keel
