// Tests for the safetensors reader/writer (runtime/model/safetensors.h) and the checkpoint
// directory loader (runtime/model/checkpoint.h): round trips, interop with the Python safetensors
// library, every malformed-input path (each must name the file and the tensor), and sharded
// indexes.
//
// Test data is written per test into a fresh directory under the system temp directory and
// removed afterwards; nothing is written into the source tree.

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/safetensors.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

// ---- helpers ---------------------------------------------------------------------------------

template <typename T>
std::vector<std::byte> as_bytes(const std::vector<T>& values) {
  std::vector<std::byte> bytes(values.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

std::vector<std::byte> f32_bytes(const std::vector<float>& values) {
  return as_bytes(values);
}

std::vector<std::byte> bf16_bytes(const std::vector<float>& values) {
  std::vector<uint16_t> halves;
  for (float value : values) halves.push_back(f32_to_bf16(value));
  return as_bytes(halves);
}

std::vector<std::byte> f16_bytes(const std::vector<float>& values) {
  std::vector<uint16_t> halves;
  for (float value : values) halves.push_back(f32_to_f16(value));
  return as_bytes(halves);
}

// Values 0, 1, ... scaled and shifted so they are exact in f16 and bf16 too.
std::vector<float> ramp(size_t count, float scale = 0.5f, float offset = -2.0f) {
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) values[i] = static_cast<float>(i) * scale + offset;
  return values;
}

std::vector<std::byte> view_bytes(const TensorView& view) {
  return std::vector<std::byte>(view.data, view.data + view.nbytes);
}

float element_as_f32(const TensorView& view, size_t index) {
  // The data region need not be aligned for foreign files, so load via memcpy.
  if (view.dtype == DType::kF32) {
    float value;
    std::memcpy(&value, view.data + index * 4, 4);
    return value;
  }
  uint16_t half;
  std::memcpy(&half, view.data + index * 2, 2);
  return view.dtype == DType::kBF16 ? bf16_to_f32(half) : f16_to_f32(half);
}

// Writes a file with an arbitrary header (and optionally a lying header length) so malformed
// inputs can be produced that our writer would refuse to create.
void write_raw(const fs::path& path, const std::string& header, size_t data_bytes,
               std::optional<uint64_t> header_length_override = std::nullopt) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out) << path;
  uint64_t header_length = header_length_override.value_or(header.size());
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header_length >> (8 * i)) & 0xff));
  out << header;
  std::string data(data_bytes, '\x5a');
  out << data;
}

// Runs `action`, which must throw keel::Error, and returns the message ("" if it did not).
std::string error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  } catch (const std::exception& error) {
    ADD_FAILURE() << "threw a non-keel exception: " << error.what();
    return error.what();
  }
  ADD_FAILURE() << "expected keel::Error, nothing was thrown";
  return "";
}

void expect_contains_all(const std::string& message, std::initializer_list<std::string> parts) {
  for (const std::string& part : parts) {
    EXPECT_NE(message.find(part), std::string::npos)
        << "message lacks \"" << part << "\"\n  message: " << message;
  }
}

void expect_open_fails(const fs::path& path, std::initializer_list<std::string> parts) {
  std::string message = error_message([&] { SafetensorsFile::open(path.string()); });
  expect_contains_all(message, {path.string()});
  expect_contains_all(message, parts);
}

bool python_has(const std::string& modules) {
  std::string command = "python3 -c 'import " + modules + "' >/dev/null 2>&1";
  return std::system(command.c_str()) == 0;
}

// Runs a Python script with the given argument; returns true on exit status 0.
bool run_python(const fs::path& script_path, const std::string& script, const fs::path& argument) {
  {
    std::ofstream out(script_path);
    out << script;
  }
  std::string command = "python3 '" + script_path.string() + "' '" + argument.string() + "'";
  return std::system(command.c_str()) == 0;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("keel_test_safetensors_" + std::to_string(::getpid()) +
                                        "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  fs::path path(const std::string& name) const { return dir_ / name; }
  std::string dir() const { return dir_.string(); }

  fs::path dir_;
};

// ---- round trip ------------------------------------------------------------------------------

TEST_F(SafetensorsTest, RoundTripAllDtypesAndRanks) {
  std::vector<TensorToWrite> tensors = {
      {"scalar.f32", DType::kF32, {}, f32_bytes({3.25f})},
      {"vector.f32", DType::kF32, {5}, f32_bytes(ramp(5))},
      {"cube.bf16", DType::kBF16, {2, 3, 4}, bf16_bytes(ramp(24))},
      {"cube.f16", DType::kF16, {4, 1, 3}, f16_bytes(ramp(12, 0.125f))},
      {"odd.f16", DType::kF16, {3}, f16_bytes({1.0f, -2.0f, 65504.0f})},  // 6 bytes: unaligned next
      {"after_odd.f32", DType::kF32, {2, 2}, f32_bytes({1e-30f, -0.0f, INFINITY, 7.0f})},
      {"empty.bf16", DType::kBF16, {0, 7}, {}},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"producer", "keel"}};
  const fs::path file_path = path("round_trip.safetensors");
  write_safetensors(file_path.string(), tensors, metadata);

  auto file = SafetensorsFile::open(file_path.string());
  EXPECT_EQ(file->path(), file_path.string());
  EXPECT_EQ(file->metadata(), metadata);
  ASSERT_EQ(file->tensors().size(), tensors.size());
  for (const TensorToWrite& expected : tensors) {
    SCOPED_TRACE(expected.name);
    const TensorView* view = file->find(expected.name);
    ASSERT_NE(view, nullptr);
    EXPECT_EQ(view->name, expected.name);
    EXPECT_EQ(view->file, file_path.string());
    EXPECT_EQ(view->dtype, expected.dtype);
    EXPECT_EQ(view->shape, expected.shape);
    EXPECT_EQ(view->nbytes, expected.bytes.size());
    EXPECT_EQ(view_bytes(*view), expected.bytes);
  }
  EXPECT_EQ(file->find("missing"), nullptr);

  const TensorView& scalar = *file->find("scalar.f32");
  EXPECT_EQ(scalar.num_elements(), 1);
  EXPECT_EQ(scalar.shape_string(), "[]");
  EXPECT_EQ(element_as_f32(scalar, 0), 3.25f);
  const TensorView& cube = *file->find("cube.bf16");
  EXPECT_EQ(cube.num_elements(), 24);
  EXPECT_EQ(cube.shape_string(), "[2, 3, 4]");
  EXPECT_EQ(element_as_f32(cube, 23), 23 * 0.5f - 2.0f);
  EXPECT_EQ(file->find("empty.bf16")->num_elements(), 0);

  // Header padded to a multiple of 8 (as the Python library does) so the data region is
  // 8-byte aligned in the file.
  std::ifstream in(file_path, std::ios::binary);
  unsigned char length_field[8];
  in.read(reinterpret_cast<char*>(length_field), 8);
  uint64_t header_length = 0;
  for (int i = 0; i < 8; ++i) header_length |= uint64_t{length_field[i]} << (8 * i);
  EXPECT_EQ(header_length % 8, 0u);
  EXPECT_EQ(fs::file_size(file_path), 8 + header_length + 6 * 4 + 24 * 2 + 12 * 2 + 3 * 2 + 16);
}

TEST_F(SafetensorsTest, RoundTripNoTensorsNoMetadata) {
  write_safetensors(path("empty.safetensors").string(), {});
  auto file = SafetensorsFile::open(path("empty.safetensors").string());
  EXPECT_TRUE(file->tensors().empty());
  EXPECT_TRUE(file->metadata().empty());
}

TEST_F(SafetensorsTest, WriterOverwritesAndLeavesNoTemporaryFiles) {
  const fs::path file_path = path("model.safetensors");
  write_safetensors(file_path.string(), {{"a", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_safetensors(file_path.string(), {{"b", DType::kF32, {2}, f32_bytes({2.0f, 3.0f})}});
  auto file = SafetensorsFile::open(file_path.string());
  EXPECT_EQ(file->find("a"), nullptr);
  ASSERT_NE(file->find("b"), nullptr);
  EXPECT_EQ(element_as_f32(*file->find("b"), 1), 3.0f);
  std::vector<std::string> entries;
  for (const auto& entry : fs::directory_iterator(dir_)) entries.push_back(entry.path().filename());
  EXPECT_EQ(entries, std::vector<std::string>{"model.safetensors"});
}

TEST_F(SafetensorsTest, WriterRejectsSizeMismatchAndLeavesNothing) {
  const fs::path file_path = path("bad.safetensors");
  std::string message = error_message([&] {
    write_safetensors(file_path.string(),
                      {{"ok", DType::kF32, {1}, f32_bytes({1.0f})},
                       {"layers.0.w", DType::kBF16, {2, 3}, bf16_bytes(ramp(5))}});
  });
  expect_contains_all(message, {file_path.string(), "layers.0.w", "[2, 3]", "BF16", "needs 12",
                                "10 bytes were given"});
  EXPECT_TRUE(fs::is_empty(dir_)) << "a failed write must leave no file behind";

  message = error_message([&] {
    write_safetensors(file_path.string(), {{"neg", DType::kF32, {-1, 2}, {}}});
  });
  expect_contains_all(message, {file_path.string(), "neg", "negative"});
  message = error_message([&] {
    write_safetensors(file_path.string(), {{"twice", DType::kF32, {1}, f32_bytes({1.0f})},
                                           {"twice", DType::kF32, {1}, f32_bytes({1.0f})}});
  });
  expect_contains_all(message, {file_path.string(), "twice", "duplicate"});
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(SafetensorsTest, WriterReportsUnwritableDirectory) {
  const fs::path file_path = path("no_such_dir") / "x.safetensors";
  std::string message = error_message([&] { write_safetensors(file_path.string(), {}); });
  expect_contains_all(message, {file_path.string()});
}

// ---- interop with the Python safetensors library --------------------------------------------

TEST_F(SafetensorsTest, ReadsFileWrittenByPythonLibrary) {
  if (!python_has("safetensors, numpy")) {
    GTEST_SKIP() << "python3 with safetensors and numpy not available; interop test skipped";
  }
  const fs::path file_path = path("from_python.safetensors");
  const char* script = R"PY(
import sys
import numpy as np
from safetensors.numpy import save_file
save_file({
    "weights.f32": (np.arange(12, dtype=np.float32) * 0.25 - 1.0).reshape(3, 4),
    "bias.f16": (np.arange(5, dtype=np.float32) / 8).astype(np.float16),
    "cube.f16": (np.arange(24, dtype=np.float32) - 12).reshape(2, 3, 4).astype(np.float16),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
}, sys.argv[1], metadata={"format": "np", "note": "written by python"})
)PY";
  ASSERT_TRUE(run_python(path("write.py"), script, file_path)) << "python writer failed";

  auto file = SafetensorsFile::open(file_path.string());
  EXPECT_EQ(file->metadata(),
            (std::map<std::string, std::string>{{"format", "np"}, {"note", "written by python"}}));
  ASSERT_EQ(file->tensors().size(), 5u);

  const TensorView& weights = *file->find("weights.f32");
  EXPECT_EQ(weights.dtype, DType::kF32);
  EXPECT_EQ(weights.shape, (std::vector<int64_t>{3, 4}));
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(element_as_f32(weights, i), i * 0.25f - 1.0f) << i;

  const TensorView& bias = *file->find("bias.f16");
  EXPECT_EQ(bias.dtype, DType::kF16);
  EXPECT_EQ(bias.shape, (std::vector<int64_t>{5}));
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(element_as_f32(bias, i), i / 8.0f) << i;

  const TensorView& cube = *file->find("cube.f16");
  EXPECT_EQ(cube.shape, (std::vector<int64_t>{2, 3, 4}));
  for (size_t i = 0; i < 24; ++i) EXPECT_EQ(element_as_f32(cube, i), i - 12.0f) << i;

  const TensorView& scalar = *file->find("scalar");
  EXPECT_TRUE(scalar.shape.empty());
  EXPECT_EQ(element_as_f32(scalar, 0), 3.5f);
  EXPECT_EQ(file->find("empty")->shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(file->find("empty")->nbytes, 0u);
}

TEST_F(SafetensorsTest, PythonLibraryReadsOurFile) {
  if (!python_has("safetensors, numpy")) {
    GTEST_SKIP() << "python3 with safetensors and numpy not available; interop test skipped";
  }
  const fs::path file_path = path("from_keel.safetensors");
  write_safetensors(file_path.string(),
                    {{"a.f32", DType::kF32, {2, 3}, f32_bytes(ramp(6))},
                     {"b.f16", DType::kF16, {3}, f16_bytes(ramp(3, 0.125f, 1.0f))},
                     {"c.f32", DType::kF32, {}, f32_bytes({-7.5f})},
                     {"d.f16", DType::kF16, {2, 1, 2}, f16_bytes(ramp(4, -1.0f, 0.0f))}},
                    {{"producer", "keel"}});
  const char* script = R"PY(
import sys
import numpy as np
from safetensors import safe_open
with safe_open(sys.argv[1], framework="np") as f:
    assert f.metadata() == {"producer": "keel"}, f.metadata()
    assert sorted(f.keys()) == ["a.f32", "b.f16", "c.f32", "d.f16"], f.keys()
    expected = {
        "a.f32": (np.arange(6, dtype=np.float32) * 0.5 - 2).reshape(2, 3),
        "b.f16": (np.arange(3, dtype=np.float32) * 0.125 + 1).astype(np.float16),
        "c.f32": np.array(-7.5, dtype=np.float32),
        "d.f16": (np.arange(4, dtype=np.float32) * -1).reshape(2, 1, 2).astype(np.float16),
    }
    for name, want in expected.items():
        got = f.get_tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        assert np.array_equal(got, want), (name, got, want)
)PY";
  EXPECT_TRUE(run_python(path("read.py"), script, file_path)) << "python reader rejected our file";
}

TEST_F(SafetensorsTest, Bf16InteropWithTorch) {
  if (!python_has("safetensors, torch")) {
    GTEST_SKIP() << "python3 with safetensors and torch not available; BF16 interop skipped";
  }
  // Python writes BF16 with torch; we read it, write it back with our writer, Python re-reads.
  const fs::path torch_path = path("torch.safetensors");
  const char* write_script = R"PY(
import sys
import torch
from safetensors.torch import save_file
save_file({"w": (torch.arange(6, dtype=torch.float32) * 0.5 - 1).reshape(2, 3).to(torch.bfloat16)},
          sys.argv[1])
)PY";
  ASSERT_TRUE(run_python(path("write.py"), write_script, torch_path));
  auto file = SafetensorsFile::open(torch_path.string());
  const TensorView& w = *file->find("w");
  EXPECT_EQ(w.dtype, DType::kBF16);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{2, 3}));
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(element_as_f32(w, i), i * 0.5f - 1.0f) << i;

  const fs::path keel_path = path("keel.safetensors");
  write_safetensors(keel_path.string(), {{"w", DType::kBF16, {3, 2}, view_bytes(w)}});
  const char* read_script = R"PY(
import sys
import torch
from safetensors.torch import load_file
w = load_file(sys.argv[1])["w"]
assert w.dtype == torch.bfloat16 and tuple(w.shape) == (3, 2), (w.dtype, w.shape)
assert torch.equal(w.float().flatten(), torch.arange(6, dtype=torch.float32) * 0.5 - 1), w
)PY";
  EXPECT_TRUE(run_python(path("read.py"), read_script, keel_path));
}

// ---- malformed files: every error names the file and (where there is one) the tensor ---------

TEST_F(SafetensorsTest, MissingFile) {
  expect_open_fails(path("nope.safetensors"), {"cannot open"});
}

TEST_F(SafetensorsTest, FileShorterThanLengthField) {
  const fs::path file_path = path("short.safetensors");
  std::ofstream(file_path, std::ios::binary) << "abc";
  expect_open_fails(file_path, {"3 bytes", "shorter than the 8-byte"});
  std::ofstream(file_path, std::ios::binary | std::ios::trunc);  // 0 bytes
  expect_open_fails(file_path, {"0 bytes"});
}

TEST_F(SafetensorsTest, HeaderLengthZero) {
  write_raw(path("zero.safetensors"), "", 16);
  expect_open_fails(path("zero.safetensors"), {"header length is 0"});
}

TEST_F(SafetensorsTest, HeaderLengthBeyondFile) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  write_raw(path("long.safetensors"), header, 4, header.size() + 100);
  expect_open_fails(path("long.safetensors"),
                    {"header length " + std::to_string(header.size() + 100), "past the end",
                     "file is " + std::to_string(8 + header.size() + 4) + " bytes"});
}

TEST_F(SafetensorsTest, HeaderLengthAbsurd) {
  write_raw(path("huge.safetensors"), "{}", 0, uint64_t{1} << 40);
  expect_open_fails(path("huge.safetensors"), {"limit"});
}

TEST_F(SafetensorsTest, HeaderNotJson) {
  write_raw(path("bad_json.safetensors"), R"({"a": {"dtype": "F32", )", 0);
  expect_open_fails(path("bad_json.safetensors"), {"not valid JSON"});
  write_raw(path("binary.safetensors"), std::string("\x00\xff\x13garbage", 10), 0);
  expect_open_fails(path("binary.safetensors"), {"not valid JSON"});
}

TEST_F(SafetensorsTest, HeaderNotObject) {
  write_raw(path("array.safetensors"), "[1, 2, 3]", 0);
  expect_open_fails(path("array.safetensors"), {"must be a JSON object", "array"});
}

TEST_F(SafetensorsTest, UnknownDtype) {
  write_raw(path("f64.safetensors"),
            R"({"model.embed":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})", 16);
  expect_open_fails(
      path("f64.safetensors"),
      {"model.embed",
       "F64 is not supported (supported: F32, BF16, F16, U8, I8, I32, F8_E4M3, F8_E8M0)"});
  write_raw(path("q4.safetensors"), R"({"x":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,1]}})",
            1);
  expect_open_fails(path("q4.safetensors"), {"tensor x", "Q4_K is not supported"});
}

TEST_F(SafetensorsTest, MissingOrMistypedFields) {
  struct Case {
    std::string header;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {R"({"t.a":{"dtype":"F32","shape":[1]}})", "missing \"data_offsets\""},
      {R"({"t.a":{"shape":[1],"data_offsets":[0,4]}})", "missing \"dtype\""},
      {R"({"t.a":{"dtype":"F32","data_offsets":[0,4]}})", "missing \"shape\""},
      {R"({"t.a":[1,2]})", "entry must be a JSON object"},
      {R"({"t.a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "dtype must be a string"},
      {R"({"t.a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "shape must be an array"},
      {R"({"t.a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "shape must be an array"},
      {R"({"t.a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "data_offsets must be"},
      {R"({"t.a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", "data_offsets must be"},
      {R"({"t.a":{"dtype":"F32","shape":[1],"data_offsets":{"b":0}}})", "data_offsets must be"},
      {R"({"t.a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "data_offsets must be"},
      {R"({"t.a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", "reversed"},
  };
  int index = 0;
  for (const Case& test_case : cases) {
    SCOPED_TRACE(test_case.header);
    const fs::path file_path = path("case" + std::to_string(index++) + ".safetensors");
    write_raw(file_path, test_case.header, 16);
    expect_open_fails(file_path, {"tensor t.a", test_case.expected});
  }
}

TEST_F(SafetensorsTest, MetadataMustBeStringMap) {
  write_raw(path("meta.safetensors"), R"({"__metadata__":{"format":"pt","layers":32}})", 0);
  expect_open_fails(path("meta.safetensors"), {"__metadata__", "layers", "must be a string"});
  write_raw(path("meta2.safetensors"), R"({"__metadata__":"pt"})", 0);
  expect_open_fails(path("meta2.safetensors"), {"__metadata__ must be an object"});
}

TEST_F(SafetensorsTest, NegativeDimension) {
  write_raw(path("neg.safetensors"),
            R"({"layers.3.mlp":{"dtype":"BF16","shape":[4,-2],"data_offsets":[0,16]}})", 16);
  expect_open_fails(path("neg.safetensors"), {"layers.3.mlp", "negative dimension -2", "axis 1"});
}

TEST_F(SafetensorsTest, OffsetsOutsideFile) {
  // Header is fine but the data region is truncated: 10 bytes present, tensor needs 16.
  write_raw(path("trunc.safetensors"),
            R"({"ok":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
            R"("lm_head":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}})",
            10);
  expect_open_fails(
      path("trunc.safetensors"),
      {"tensor lm_head", "point outside the file: data region is 10 bytes, tensor ends at 16"});
}

TEST_F(SafetensorsTest, ShapeSizeMismatch) {
  write_raw(path("size.safetensors"),
            R"({"attn.q":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24);
  expect_open_fails(path("size.safetensors"),
                    {"tensor attn.q", "[2, 3]", "F32", "needs 24 bytes", "span 20 bytes"});
  write_raw(path("overflow.safetensors"),
            R"({"big":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4);
  expect_open_fails(path("overflow.safetensors"), {"tensor big", "overflow"});
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  write_raw(path("overlap.safetensors"),
            R"({"first":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
            R"("zero":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},)"
            R"("second":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
            24);
  expect_open_fails(path("overlap.safetensors"), {"first", "second", "overlap"});
  // Containment is overlap too, even with a non-overlapping tensor sorted in between.
  write_raw(path("contain.safetensors"),
            R"({"outer":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},)"
            R"("inner":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            32);
  expect_open_fails(path("contain.safetensors"), {"outer", "inner", "overlap"});
  // Adjacent and empty ranges are fine.
  write_raw(path("adjacent.safetensors"),
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
            R"("b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}})",
            12);
  EXPECT_EQ(SafetensorsFile::open(path("adjacent.safetensors").string())->tensors().size(), 3u);
}

TEST_F(SafetensorsTest, UnalignedDataRegionIsAccepted) {
  // An unpadded header of odd length: the data region starts at an odd offset in the file.
  const std::string header = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} )";
  ASSERT_EQ(header.size() % 2, 1u);
  {
    std::ofstream out(path("odd.safetensors"), std::ios::binary);
    uint64_t length = header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((length >> (8 * i)) & 0xff));
    out << header;
    float value = 1.5f;
    out.write(reinterpret_cast<const char*>(&value), 4);
  }
  auto file = SafetensorsFile::open(path("odd.safetensors").string());
  EXPECT_EQ(element_as_f32(*file->find("x"), 0), 1.5f);
}

// ---- checkpoint directories ------------------------------------------------------------------

void write_index(const fs::path& dir, const std::string& weight_map_json) {
  std::ofstream(dir / "model.safetensors.index.json")
      << R"({"metadata": {"total_size": 0}, "weight_map": )" << weight_map_json << "}";
}

TEST_F(SafetensorsTest, CheckpointSingleFile) {
  write_safetensors(path("model.safetensors").string(),
                    {{"embed", DType::kBF16, {4, 2}, bf16_bytes(ramp(8))},
                     {"norm", DType::kF32, {2}, f32_bytes({1.0f, 2.0f})}});
  Checkpoint checkpoint = Checkpoint::open(dir());
  EXPECT_EQ(checkpoint.directory(), dir());
  EXPECT_EQ(checkpoint.tensor_names(), (std::vector<std::string>{"embed", "norm"}));
  EXPECT_EQ(checkpoint.get("embed", {4, 2}).dtype, DType::kBF16);
  EXPECT_EQ(element_as_f32(checkpoint.get("norm"), 1), 2.0f);
  EXPECT_EQ(checkpoint.find("absent"), nullptr);

  std::string message = error_message([&] { checkpoint.get("embed", {2, 4}); });
  EXPECT_EQ(message, "checkpoint " + dir() +
                         ", file model.safetensors, tensor embed: expected shape [2, 4], found "
                         "[4, 2]");
  message = error_message([&] { checkpoint.get("lm_head"); });
  EXPECT_EQ(message, "tensor lm_head not found in checkpoint " + dir());
  message = error_message([&] { checkpoint.get("lm_head", {1}); });
  expect_contains_all(message, {"lm_head", "not found", dir()});
}

TEST_F(SafetensorsTest, CheckpointShardedWithIndex) {
  write_safetensors(path("model-00001-of-00002.safetensors").string(),
                    {{"embed", DType::kBF16, {4, 2}, bf16_bytes(ramp(8))},
                     {"layers.0.w", DType::kF16, {2, 2}, f16_bytes(ramp(4))}});
  write_safetensors(path("model-00002-of-00002.safetensors").string(),
                    {{"layers.1.w", DType::kF16, {2, 2}, f16_bytes(ramp(4, 1.0f, 0.0f))},
                     {"lm_head", DType::kF32, {2, 4}, f32_bytes(ramp(8))}});
  write_index(dir_, R"({"embed": "model-00001-of-00002.safetensors",
                        "layers.0.w": "model-00001-of-00002.safetensors",
                        "layers.1.w": "model-00002-of-00002.safetensors",
                        "lm_head": "model-00002-of-00002.safetensors"})");
  // A stray single file is ignored when the index exists (the index is authoritative).
  write_safetensors(path("model.safetensors").string(),
                    {{"stale", DType::kF32, {1}, f32_bytes({0.0f})}});

  Checkpoint checkpoint = Checkpoint::open(dir());
  EXPECT_EQ(checkpoint.tensor_names(),
            (std::vector<std::string>{"embed", "layers.0.w", "layers.1.w", "lm_head"}));
  EXPECT_EQ(fs::path(checkpoint.get("layers.1.w").file).filename(),
            "model-00002-of-00002.safetensors");
  EXPECT_EQ(element_as_f32(checkpoint.get("layers.1.w", {2, 2}), 3), 3.0f);
  EXPECT_EQ(element_as_f32(checkpoint.get("lm_head", {2, 4}), 7), 1.5f);
  EXPECT_EQ(checkpoint.find("stale"), nullptr);

  // Views stay valid when the Checkpoint is moved (they point into the shards' mappings).
  Checkpoint moved = std::move(checkpoint);
  EXPECT_EQ(element_as_f32(moved.get("embed"), 1), -1.5f);
  std::string message = error_message([&] { moved.get("lm_head", {4, 2}); });
  EXPECT_EQ(message, "checkpoint " + dir() +
                         ", file model-00002-of-00002.safetensors, tensor lm_head: expected shape "
                         "[4, 2], found [2, 4]");
}

TEST_F(SafetensorsTest, CheckpointIndexNamesMissingFile) {
  write_safetensors(path("a.safetensors").string(), {{"x", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_index(dir_, R"({"x": "a.safetensors", "y": "gone.safetensors"})");
  std::string message = error_message([&] { Checkpoint::open(dir()); });
  expect_contains_all(message, {"gone.safetensors", "tensor y", "does not exist", dir()});
}

TEST_F(SafetensorsTest, CheckpointTensorMissingFromItsShard) {
  write_safetensors(path("a.safetensors").string(), {{"x", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_safetensors(path("b.safetensors").string(), {{"y", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_index(dir_, R"({"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"})");
  std::string message = error_message([&] { Checkpoint::open(dir()); });
  expect_contains_all(message, {"b.safetensors", "tensor z", "not in that file", dir()});

  // Indexed under the wrong shard (both shards listed): the message names both.
  write_index(dir_, R"({"x": "b.safetensors", "y": "a.safetensors"})");
  message = error_message([&] { Checkpoint::open(dir()); });
  expect_contains_all(message, {"tensor x", "names file b.safetensors", "is in a.safetensors"});
}

TEST_F(SafetensorsTest, CheckpointTensorInTwoShards) {
  write_safetensors(path("a.safetensors").string(),
                    {{"shared.w", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_safetensors(path("b.safetensors").string(),
                    {{"shared.w", DType::kF32, {1}, f32_bytes({2.0f})},
                     {"y", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_index(dir_, R"({"shared.w": "a.safetensors", "y": "b.safetensors"})");
  std::string message = error_message([&] { Checkpoint::open(dir()); });
  expect_contains_all(message,
                      {"tensor shared.w", "two files", "a.safetensors", "b.safetensors", dir()});
}

TEST_F(SafetensorsTest, CheckpointIndexRejectsPathsOutsideDirectory) {
  fs::create_directories(path("sub"));
  write_safetensors(path("sub/a.safetensors").string(),
                    {{"x", DType::kF32, {1}, f32_bytes({1.0f})}});
  write_index(dir_, R"({"x": "sub/a.safetensors"})");
  std::string message = error_message([&] { Checkpoint::open(dir()); });
  expect_contains_all(message, {"sub/a.safetensors", "tensor x", "model.safetensors.index.json"});
  write_index(dir_, R"({"x": "../a.safetensors"})");
  message = error_message([&] { Checkpoint::open(dir()); });
  expect_contains_all(message, {"../a.safetensors", "tensor x"});
}

TEST_F(SafetensorsTest, CheckpointBadIndex) {
  std::ofstream(path("model.safetensors.index.json")) << R"({"weight_map": )";
  expect_contains_all(error_message([&] { Checkpoint::open(dir()); }),
                      {"model.safetensors.index.json", "not valid JSON"});
  std::ofstream(path("model.safetensors.index.json")) << R"({"metadata": {}})";
  expect_contains_all(error_message([&] { Checkpoint::open(dir()); }),
                      {"model.safetensors.index.json", "missing \"weight_map\""});
  std::ofstream(path("model.safetensors.index.json")) << R"({"weight_map": {"x": 3}})";
  expect_contains_all(error_message([&] { Checkpoint::open(dir()); }),
                      {"model.safetensors.index.json", "tensor x", "must be a string"});
}

TEST_F(SafetensorsTest, CheckpointWithoutModelFiles) {
  std::ofstream(path("config.json")) << "{}";
  EXPECT_EQ(error_message([&] { Checkpoint::open(dir()); }),
            "no model.safetensors or model.safetensors.index.json in " + dir());
  expect_contains_all(error_message([&] { Checkpoint::open(path("absent").string()); }),
                      {path("absent").string(), "does not exist"});
}

TEST_F(SafetensorsTest, CheckpointPropagatesShardErrors) {
  write_raw(path("model.safetensors"),
            R"({"layers.7.w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8);
  expect_contains_all(error_message([&] { Checkpoint::open(dir()); }),
                      {path("model.safetensors").string(), "layers.7.w", "F64 is not supported"});
}

}  // namespace
}  // namespace keel
