// A checkpoint directory in the HF layout: config.json plus either model.safetensors or
// shards listed in model.safetensors.index.json ({"weight_map": {tensor: file}}). Tensors are
// looked up by name across shards; the index is validated (every listed file exists and holds
// the tensors the index says; no tensor in two files).
#pragma once

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
  // Throws keel::Error "tensor NAME not found in checkpoint DIR" when absent.
  const TensorView& get(const std::string& name) const;
  // Throws keel::Error naming file, tensor, expected vs found shape when it does not match.
  const TensorView& get(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  std::vector<std::string> tensor_names() const;

 private:
  std::string directory_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

}  // namespace keel
