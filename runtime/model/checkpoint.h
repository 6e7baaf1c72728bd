// A checkpoint directory in the HF layout: config.json plus either model.safetensors or
// shards listed in model.safetensors.index.json ({"weight_map": {tensor: file}}). Tensors are
// looked up by name across shards; the index is validated (every listed file exists and holds
// the tensors the index says; no tensor in two files).
#pragma once

#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/safetensors.h"

namespace keel {

class Checkpoint {
 public:
  // Throws keel::Error naming the directory/file when the layout is wrong.
  static Checkpoint open(const std::string& directory);

  const std::string& directory() const { return directory_; }
  // nullptr when absent.
  const TensorView* find(const std::string& name) const;
  // Throws keel::Error "tensor NAME not found in checkpoint DIR" when absent, or naming the
  // dtype when the tensor is not a float weight (F32/BF16/F16).
  const TensorView& get(const std::string& name) const;
  // Any stored type (quantized codes and scales).
  const TensorView& get_any(const std::string& name) const;
  // A tensor of one of the `allowed` stored types with exactly `expected_shape`.
  const TensorView& get_typed(const std::string& name, const std::vector<int64_t>& expected_shape,
                              std::initializer_list<TensorType> allowed) const;
  // Throws keel::Error naming file, tensor, expected vs found shape when they differ.
  void check_shape(const TensorView& view, const std::vector<int64_t>& expected_shape) const;
  // Throws keel::Error naming file, tensor, expected vs found shape when it does not match.
  const TensorView& get(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  std::vector<std::string> tensor_names() const;

 private:
  std::string directory_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

}  // namespace keel
