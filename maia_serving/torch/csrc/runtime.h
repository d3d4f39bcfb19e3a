// The emulated Maia device's runtime: chips, their HBM as counted host memory, the current chip.
// PyTorch reaches it through PrivateUse1 (renamed "maia"): the allocator, the device guard, the hooks
// and a generator are registered in runtime.cpp; the operators in aten.cpp and kernels.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace maia {

constexpr c10::DeviceType kMaia = c10::DeviceType::PrivateUse1;

// Chips of the profile's node and each one's HBM, and the dtypes its units do not compute in (c10
// names, with what to say when a tensor asks for one). Changeable while no tensor is held; the chip's
// name goes into the out-of-memory message.
void configure(int chips, int64_t hbm_bytes, const std::string& chip_name, const std::vector<std::string>& refused,
               const std::string& refusal);
// Raises TypeError when operator ``op`` would compute (matrix units: GEMMs, convolution, attention) in a
// dtype the profile's units do not compute in. Storing and moving such tensors is allowed (printing a
// tensor converts it to float64 on its device).
void check_dtype(c10::ScalarType dtype, const std::string& op);
bool configured();
c10::DeviceIndex device_count();
c10::DeviceIndex current_device();
void set_device(c10::DeviceIndex index);
void check_index(c10::DeviceIndex index);

c10::DeviceAllocator* allocator();

// A CPU storage over a maia storage's memory (no copy), and a CPU tensor over a maia tensor's, so
// the host's CPU kernels can run on them.
c10::Storage host_storage(const c10::Storage& maia);
at::Tensor host_alias(const at::Tensor& maia);
// ``t`` as the host's CPU kernels take it: ``host_alias`` of a maia tensor, any other (or undefined) one as it is.
at::Tensor on_host(const at::Tensor& t);
// Joins chip ``index`` to the chips ``op``'s tensors were on so far (``chip``: none yet, or the one), or raises
// naming both and what to do: an operator runs on one chip.
void join_chip(std::optional<c10::DeviceIndex>& chip, c10::DeviceIndex index, const std::string& op);
// ``like``'s sizes, strides and offset over ``storage``, a tensor of ``keys``' backend.
at::Tensor on_storage(const c10::Storage& storage, const at::Tensor& like, c10::DispatchKey key);
// A maia tensor that takes over a CPU tensor's memory (no copy), counted on chip ``device``'s HBM.
at::Tensor adopt(const at::Tensor& host, c10::DeviceIndex device);
// The same, for a whole storage: the memory a CPU kernel allocated, now held by chip ``device``.
c10::Storage adopt_storage(const c10::Storage& host, c10::DeviceIndex device);
c10::DataPtr adopt_data(const c10::Storage& host, c10::DeviceIndex device);

// Run the other operators through at::native::cpu_fallback (copies both ways) instead of the aliasing
// fallback: only to measure what the aliasing saves.
void use_copying_fallback(bool copying);

}  // namespace maia
