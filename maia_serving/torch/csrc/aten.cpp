// The operators PrivateUse1 must have (tensor creation, views, copies), and one boxed fallback that
// runs every other operator with the host's CPU kernel on the same memory: each maia argument is seen
// through a CPU alias (no copy), and each new result's memory is adopted by the chip (no copy).
// at::native::cpu_fallback instead copies every argument to the host and every mutated one back.
#include "runtime.h"
#include "trace.h"

#include <ATen/EmptyTensor.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/copy_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

namespace maia {
namespace {

constexpr c10::DispatchKeySet kMaiaKeys(c10::DispatchKey::PrivateUse1);

c10::Device maia_device(std::optional<c10::Device> device) {
  const c10::Device d = c10::device_or_default(device);
  TORCH_CHECK(d.type() == kMaia, "maia: expected a maia device, got ", d);
  return d.has_index() ? d : c10::Device(kMaia, current_device());
}

void check_layout(std::optional<c10::Layout> layout, std::optional<bool> pin_memory) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided,
              "maia holds strided (dense) tensors only; convert sparse tensors with .to_dense() first");
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory), "pinned memory is host memory: pin CPU tensors, not maia ones");
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                               std::optional<bool> pin_memory, std::optional<c10::MemoryFormat> memory_format) {
  check_layout(layout, pin_memory);
  const c10::DeviceGuard guard(maia_device(device));
  return at::detail::empty_generic(size, allocator(), kMaiaKeys, c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                         std::optional<bool> pin_memory) {
  check_layout(layout, pin_memory);
  const c10::DeviceGuard guard(maia_device(device));
  return at::detail::empty_strided_generic(size, stride, allocator(), kMaiaKeys, c10::dtype_or_default(dtype));
}

at::Tensor as_strided(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                      std::optional<c10::SymInt> offset) {
  std::optional<int64_t> o;
  if (offset) {
    o = offset->expect_int();
  }
  return at::native::as_strided_tensorimpl(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), o);
}

at::Tensor view(const at::Tensor& self, c10::SymIntArrayRef size) {
  return at::native::view(self, C10_AS_INTARRAYREF_SLOW(size));
}

at::Tensor reshape_alias(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::native::_reshape_alias(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
}

const at::Tensor& resize(const at::Tensor& self, c10::SymIntArrayRef size, std::optional<c10::MemoryFormat> format) {
  const c10::DeviceGuard guard(self.device());
  return at::native::resize_(self, C10_AS_INTARRAYREF_SLOW(size), format);
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) { return at::native::set_tensor_(self, source); }
at::Tensor& set_storage(at::Tensor& self, at::Storage source) { return at::native::set_(self, source); }
at::Tensor& set_storage_offset(at::Tensor& self, at::Storage source, c10::SymInt offset, c10::SymIntArrayRef size,
                               c10::SymIntArrayRef stride) {
  return at::native::set_storage_cpu_(self, source, offset.expect_int(), C10_AS_INTARRAYREF_SLOW(size),
                                      C10_AS_INTARRAYREF_SLOW(stride));
}

// Host to chip, chip to host, chip to chip: the bytes move on the host; trace.h prices each over
// the link it would cross (the host link, the interconnect, or the chip's own HBM).
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  const auto src_host = on_host(self);
  auto dst_host = on_host(dst);
  TORCH_CHECK(src_host.is_cpu() && dst_host.is_cpu(), "maia copies to and from the host's CPU tensors and other maia "
              "tensors; move ", (src_host.is_cpu() ? dst : self).device(), " tensors to the CPU first");
  Span span("aten::_copy_from", dst.device().type() == kMaia ? dst.device().index() : self.device().index());
  at::native::copy_(dst_host, src_host, non_blocking);
  span.copy(self, dst);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  resize(dst, c10::fromIntArrayRefSlow(self.sizes()), std::nullopt);
  return copy_from(self, dst, false);
}

at::Scalar local_scalar_dense(const at::Tensor& self) { return at::native::_local_scalar_dense_cpu(host_alias(self)); }

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("resize_", resize);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
}

}  // namespace maia
