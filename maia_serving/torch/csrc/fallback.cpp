// Every operator without a maia kernel runs as the host's CPU kernel on the same memory.
//
// Arguments: each maia tensor is seen through a CPU tensor over its memory (views of one storage
// share one CPU storage, so aliasing checks still see them as one); a maia device argument (factory
// operators) becomes the CPU. Results: one that is an argument written in place is that argument; one
// over an argument's memory (a view) is a maia view of it; a new one's memory is adopted by the chip
// and counted on its HBM. An out= argument the CPU kernel had to grow gets the grown memory. Nothing
// is copied, where at::native::cpu_fallback copies every argument there and every mutated one back.
#include "runtime.h"
#include "trace.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUFallback.h>
#include <torch/library.h>

#include <atomic>
#include <unordered_set>
#include <utility>
#include <vector>

namespace maia {
namespace {

class HostView {
 public:
  explicit HostView(const c10::OperatorHandle& op) : op_(op) {}

  // The argument as the CPU kernel takes it.
  c10::IValue to_host(const c10::IValue& v) {
    if (v.isTensor()) {
      return tensor(v.toTensor());
    }
    if (v.isTensorList()) {
      c10::List<at::Tensor> out;
      for (const at::Tensor& t : v.toTensorVector()) {
        out.push_back(tensor(t));
      }
      return out;
    }
    if (v.isOptionalTensorList()) {
      c10::List<std::optional<at::Tensor>> out;
      for (const std::optional<at::Tensor>& t : v.toOptionalTensorVector()) {
        out.push_back(t ? std::optional<at::Tensor>(tensor(*t)) : std::nullopt);
      }
      return out;
    }
    if (v.isDevice() && v.toDevice().type() == kMaia) {
      chip(v.toDevice().has_index() ? v.toDevice().index() : current_device());
      return c10::Device(c10::kCPU);
    }
    return v;
  }

  // The result as maia returns it.
  c10::IValue to_maia(const c10::IValue& v) {
    if (v.isTensor()) {
      return result(v.toTensor());
    }
    if (v.isTensorList()) {
      c10::List<at::Tensor> out;
      for (const at::Tensor& t : v.toTensorVector()) {
        out.push_back(result(t));
      }
      return out;
    }
    return v;
  }

  c10::DeviceIndex device() const { return device_ ? *device_ : current_device(); }

  // A maia argument the kernel wrote: if it reallocated or reshaped the CPU view, the maia tensor follows.
  void write_back(const at::Tensor& maia, const at::Tensor& host) {
    if (!maia.defined() || maia.device().type() != kMaia) {
      return;
    }
    c10::StorageImpl* impl = maia.storage().unsafeGetStorageImpl();
    if (host.storage().data() != maia.storage().data() || host.storage().nbytes() != maia.storage().nbytes()) {
      impl->set_data_ptr_noswap(adopt_data(host.storage(), maia.device().index()));
      impl->set_nbytes(host.storage().nbytes());
    }
    if (host.sizes() != maia.sizes() || host.strides() != maia.strides() ||
        host.storage_offset() != maia.storage_offset()) {
      maia.unsafeGetTensorImpl()->set_sizes_and_strides(host.sizes(), host.strides(), host.storage_offset());
    }
  }

 private:
  void chip(c10::DeviceIndex index) { join_chip(device_, index, c10::str(op_.schema().operator_name())); }

  at::Tensor tensor(const at::Tensor& t) {
    if (!t.defined() || t.device().type() != kMaia) {
      return t;
    }
    chip(t.device().index());
    c10::StorageImpl* key = t.storage().unsafeGetStorageImpl();
    for (const auto& [maia, host] : storages_) {
      if (maia == key) {
        return on_storage(host, t, c10::DispatchKey::CPU);
      }
    }
    storages_.emplace_back(key, host_storage(t.storage()));
    maia_storages_.push_back(t.storage());
    return on_storage(storages_.back().second, t, c10::DispatchKey::CPU);
  }

  at::Tensor result(const at::Tensor& t) {
    if (!t.defined() || t.device().type() == kMaia) {
      return t;
    }
    TORCH_CHECK(t.is_cpu(), op_.schema().operator_name(), " on maia returned a ", t.device(), " tensor");
    const void* data = t.storage().data();
    for (size_t i = 0; i < storages_.size(); ++i) {  // a view of an argument
      if (storages_[i].second.unsafeGetStorageImpl() == t.storage().unsafeGetStorageImpl() ||
          (data != nullptr && storages_[i].second.data() == data)) {
        return on_storage(maia_storages_[i], t, c10::DispatchKey::PrivateUse1);
      }
    }
    for (const auto& [host, maia] : adopted_) {  // another result over the same new memory
      if (host == t.storage().unsafeGetStorageImpl()) {
        return on_storage(maia, t, c10::DispatchKey::PrivateUse1);
      }
    }
    adopted_.emplace_back(t.storage().unsafeGetStorageImpl(), adopt_storage(t.storage(), device()));
    return on_storage(adopted_.back().second, t, c10::DispatchKey::PrivateUse1);
  }

  const c10::OperatorHandle& op_;
  std::optional<c10::DeviceIndex> device_;
  std::vector<std::pair<c10::StorageImpl*, c10::Storage>> storages_;  // maia storage -> its CPU view
  std::vector<c10::Storage> maia_storages_;                          // kept alive, same order
  std::vector<std::pair<c10::StorageImpl*, c10::Storage>> adopted_;   // new CPU storage -> maia storage
};

// The operators that run on a chip's matrix units (convolution and attention have their own kernels):
// their dtype must be one the profile computes in.
bool on_matrix_units(const std::string& name) {
  static const std::unordered_set<std::string> names = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                                        "aten::addbmm", "aten::addmv", "aten::mv", "aten::dot",
                                                        "aten::vdot", "aten::_addmm_activation"};
  return names.count(name) > 0;
}

std::atomic<bool> g_copying{false};

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  if (g_copying.load(std::memory_order_relaxed)) {  // PyTorch's own, unpriced: benchmarks/torch_device.py compares
    at::native::cpu_fallback(op, stack);
    return;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(
      op.hasKernelForDispatchKey(c10::DispatchKey::CPU), schema.operator_name(),
      " has no CPU kernel, and maia runs an operator without its own kernel as the host's CPU kernel. "
      "Run this part of the model on the CPU (.cpu(), then .to(\"maia\") after it), or ask for a maia kernel for it.");
  const auto& arguments = schema.arguments();
  const size_t first = stack->size() - arguments.size();
  if (on_matrix_units(schema.operator_name().name) && (*stack)[first].isTensor()) {
    check_dtype((*stack)[first].toTensor().scalar_type(), schema.operator_name().name);
  }
  HostView view(op);
  std::vector<Arg> traced;
  traced.reserve(arguments.size());
  std::vector<c10::IValue> originals(stack->begin() + first, stack->end());
  for (size_t i = 0; i < arguments.size(); ++i) {
    traced.push_back(arg_of(originals[i]));
    (*stack)[first + i] = view.to_host(originals[i]);
  }
  // Host tensors of written arguments, kept past the call (the kernel pops its arguments).
  std::vector<std::pair<size_t, at::Tensor>> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias && alias->isWrite() && (*stack)[first + i].isTensor()) {
      written.emplace_back(i, (*stack)[first + i].toTensor());
    }
  }
  Span span(schema.operator_name().name + (schema.overload_name().empty() ? "" : "." + schema.overload_name()),
            view.device());
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  for (const auto& [i, host] : written) {
    view.write_back(originals[i].toTensor(), host);
  }
  const auto& returns = schema.returns();
  const size_t out_first = stack->size() - returns.size();
  std::vector<Meta> outputs;
  for (size_t r = 0; r < returns.size(); ++r) {
    c10::IValue& value = (*stack)[out_first + r];
    const auto* alias = returns[r].alias_info();
    bool in_place = false;
    if (alias && alias->isWrite()) {  // `Tensor(a!)`: the argument of the same alias set, itself
      for (size_t i = 0; i < arguments.size() && !in_place; ++i) {
        const auto* arg_alias = arguments[i].alias_info();
        if (arg_alias && arg_alias->isWrite() && arg_alias->beforeSets() == alias->beforeSets()) {
          value = originals[i];
          in_place = true;
        }
      }
    }
    if (!in_place) {
      value = view.to_maia(value);
    }
    if (value.isTensor()) {
      outputs.push_back(meta_of(value.toTensor()));
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorVector()) {
        outputs.push_back(meta_of(t));
      }
    }
  }
  span.args(std::move(traced));
  span.outputs(std::move(outputs));
}

}  // namespace

void use_copying_fallback(bool copying) { g_copying.store(copying); }

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>()); }

// Norms whose CompositeExplicitAutograd decomposition would otherwise run on PrivateUse1 before the fallback is
// asked (layer norm as a batch norm and an addcmul, group norm as six elementwise operators): the host's fused
// kernel, one operator, as a device runs it and as it is priced.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("native_layer_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("native_group_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

}  // namespace maia
