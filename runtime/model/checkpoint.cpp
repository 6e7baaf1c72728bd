// Checkpoint directory loader: a single model.safetensors, or shards listed in
// model.safetensors.index.json. The index wins when both exist (that is what HF loaders do).
//
// The index is validated against the shards rather than trusted: a stale or hand-edited index
// otherwise shows up much later as a confusing "tensor not found" or, worse, as a tensor read
// from the wrong shard. Shard files are opened once each (they are mmapped, so opening all of
// them up front costs address space, not memory).

#include "runtime/model/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "kernels/base/check.h"

namespace keel {

namespace {

namespace fs = std::filesystem;

constexpr const char* kSingleFileName = "model.safetensors";
constexpr const char* kIndexFileName = "model.safetensors.index.json";

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// Reads the index's weight_map as tensor -> shard file name.
std::map<std::string, std::string> read_weight_map(const fs::path& index_path) {
  const std::string where = "checkpoint index " + index_path.string();
  std::ifstream stream(index_path, std::ios::binary);
  if (!stream) throw_error("cannot open ", where);
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(stream);
  } catch (const nlohmann::json::exception& error) {
    throw_error(where, ": not valid JSON: ", error.what());
  }
  if (!index.is_object()) throw_error(where, ": must be a JSON object, found ", index.type_name());
  auto weight_map_it = index.find("weight_map");
  if (weight_map_it == index.end()) throw_error(where, ": missing \"weight_map\"");
  if (!weight_map_it->is_object()) {
    throw_error(where, ": \"weight_map\" must be an object {tensor: file}, found ",
                weight_map_it->type_name());
  }
  std::map<std::string, std::string> weight_map;
  for (const auto& [tensor, file] : weight_map_it->items()) {
    if (!file.is_string()) {
      throw_error(where, ", tensor ", tensor, ": file name must be a string, found ",
                  file.type_name());
    }
    std::string file_name = file.get<std::string>();
    // Shards must sit in the checkpoint directory itself; anything else is either a broken
    // index or an attempt to read files outside it.
    if (file_name.empty() || file_name.find('/') != std::string::npos ||
        file_name.find("..") != std::string::npos) {
      throw_error(where, ", tensor ", tensor, ": file name \"", file_name,
                  "\" is not a plain file name in the checkpoint directory");
    }
    weight_map.emplace(tensor, std::move(file_name));
  }
  return weight_map;
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& directory) {
  Checkpoint checkpoint;
  checkpoint.directory_ = directory;
  const fs::path dir(directory);
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    throw_error("checkpoint directory ", directory, " does not exist or is not a directory");
  }

  const fs::path index_path = dir / kIndexFileName;
  const fs::path single_path = dir / kSingleFileName;
  std::map<std::string, std::string> weight_map;  // empty for a single-file checkpoint
  if (fs::exists(index_path, error)) {
    weight_map = read_weight_map(index_path);
    std::set<std::string> shard_names;
    for (const auto& [tensor, file_name] : weight_map) {
      if (shard_names.insert(file_name).second && !fs::is_regular_file(dir / file_name, error)) {
        throw_error("checkpoint index ", index_path.string(), " names file ", file_name,
                    " (for tensor ", tensor, "), which does not exist in ", directory);
      }
    }
    for (const std::string& file_name : shard_names) {
      checkpoint.files_.push_back(SafetensorsFile::open((dir / file_name).string()));
    }
  } else if (fs::exists(single_path, error)) {
    checkpoint.files_.push_back(SafetensorsFile::open(single_path.string()));
  } else {
    throw_error("no ", kSingleFileName, " or ", kIndexFileName, " in ", directory);
  }

  for (const auto& file : checkpoint.files_) {
    for (const auto& [name, view] : file->tensors()) {
      auto [it, inserted] = checkpoint.by_name_.emplace(name, &view);
      if (!inserted) {
        throw_error("checkpoint ", directory, ": tensor ", name,
                    " appears in two files: ", fs::path(it->second->file).filename().string(),
                    " and ", fs::path(file->path()).filename().string());
      }
    }
  }

  // Every indexed tensor must be in the shard the index names; a tensor found elsewhere means
  // the index is stale.
  for (const auto& [tensor, file_name] : weight_map) {
    auto it = checkpoint.by_name_.find(tensor);
    if (it == checkpoint.by_name_.end()) {
      throw_error("checkpoint ", directory, ": index names file ", file_name, " for tensor ",
                  tensor, ", but the tensor is not in that file");
    }
    const std::string actual_file = fs::path(it->second->file).filename().string();
    if (actual_file != file_name) {
      throw_error("checkpoint ", directory, ": index names file ", file_name, " for tensor ",
                  tensor, ", but the tensor is in ", actual_file);
    }
  }
  return checkpoint;
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::get_any(const std::string& name) const {
  const TensorView* view = find(name);
  if (!view) throw_error("tensor ", name, " not found in checkpoint ", directory_);
  return *view;
}

const TensorView& Checkpoint::get(const std::string& name) const {
  const TensorView& view = get_any(name);
  if (!view.is_float()) {
    throw_error("checkpoint ", directory_, ", file ", fs::path(view.file).filename().string(),
                ", tensor ", name, ": dtype ", tensor_type_name(view.type),
                " where a float weight (F32, BF16, F16) is expected");
  }
  return view;
}

const TensorView& Checkpoint::get_typed(const std::string& name,
                                        const std::vector<int64_t>& expected_shape,
                                        std::initializer_list<TensorType> allowed) const {
  const TensorView& view = get_any(name);
  if (std::find(allowed.begin(), allowed.end(), view.type) == allowed.end()) {
    std::string names;
    for (TensorType type : allowed)
      names += (names.empty() ? "" : " or ") + std::string(tensor_type_name(type));
    throw_error("checkpoint ", directory_, ", file ", fs::path(view.file).filename().string(),
                ", tensor ", name, ": dtype ", tensor_type_name(view.type), ", expected ", names);
  }
  check_shape(view, expected_shape);
  return view;
}

void Checkpoint::check_shape(const TensorView& view,
                             const std::vector<int64_t>& expected_shape) const {
  if (view.shape != expected_shape) {
    throw_error("checkpoint ", directory_, ", file ", fs::path(view.file).filename().string(),
                ", tensor ", view.name, ": expected shape ", shape_to_string(expected_shape),
                ", found ", view.shape_string());
  }
}

const TensorView& Checkpoint::get(const std::string& name,
                                  const std::vector<int64_t>& expected_shape) const {
  const TensorView& view = get(name);
  if (view.shape != expected_shape) {
    throw_error("checkpoint ", directory_, ", file ", fs::path(view.file).filename().string(),
                ", tensor ", name, ": expected shape ", shape_to_string(expected_shape), ", found ",
                view.shape_string());
  }
  return view;
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(by_name_.size());
  for (const auto& entry : by_name_) names.push_back(entry.first);
  return names;
}

}  // namespace keel
