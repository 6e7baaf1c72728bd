// Device discovery. GPU-only tests and `--backend cuda` ask this first, so that on machines
// without a GPU they skip or fail with a clear message instead of a CUDA error code.
#pragma once

#include <string>

namespace keel::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device.
int device_count();
// Human-readable reason when device_count() is 0 (the CUDA error string).
std::string no_device_reason();

}  // namespace keel::cuda
