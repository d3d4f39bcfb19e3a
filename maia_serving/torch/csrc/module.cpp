// The Python side of the extension: set the node up, read the trace log. Everything PyTorch itself
// calls (allocator, guard, hooks, operators) registers at load time in the other files.
#include "runtime.h"
#include "trace.h"

// Plain pybind11, not torch/extension.h: nothing here passes a tensor to Python, and that header is
// two thirds of the extension's build time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

py::object meta_to_py(const maia::Meta& m) {
  if (!m.defined) {
    return py::none();
  }
  const auto dtype = static_cast<c10::ScalarType>(m.dtype);
  return py::make_tuple(py::tuple(py::cast(m.sizes)), py::tuple(py::cast(m.strides)), m.offset,
                        c10::toString(dtype), c10::elementSize(dtype), m.device);
}

py::object arg_to_py(const maia::Arg& arg) {
  return std::visit(
      [](const auto& v) -> py::object {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::monostate>) {
          return py::none();
        } else if constexpr (std::is_same_v<T, maia::Meta>) {
          return meta_to_py(v);
        } else if constexpr (std::is_same_v<T, std::vector<maia::Meta>>) {
          py::list out;
          for (const auto& m : v) {
            out.append(meta_to_py(m));
          }
          return py::tuple(out);
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          return py::tuple(py::cast(v));
        } else {
          return py::cast(v);
        }
      },
      arg);
}

// (new signatures as (op, args, outputs) tuples, runs as bytes of maia::Run records).
py::tuple drain() {
  maia::Drained drained;
  {
    py::gil_scoped_release release;
    drained = maia::drain();
  }
  py::list signatures;
  for (const auto& s : drained.signatures) {
    py::list args;
    for (const auto& a : s.args) {
      args.append(arg_to_py(a));
    }
    py::list outputs;
    for (const auto& m : s.outputs) {
      outputs.append(meta_to_py(m));
    }
    signatures.append(py::make_tuple(s.op, py::tuple(args), py::tuple(outputs)));
  }
  const auto* bytes = reinterpret_cast<const char*>(drained.runs.data());
  return py::make_tuple(signatures, py::bytes(bytes, drained.runs.size() * sizeof(maia::Run)));
}

void on_full(py::object flush, size_t threshold) {
  if (flush.is_none()) {
    maia::on_full(nullptr, 0);
    return;
  }
  // Never freed: the log outlives the interpreter (static storage), and dropping a Python reference after
  // the interpreter finalized aborts. One small object per profile change.
  auto* keep = new py::object(std::move(flush));
  maia::on_full(
      [keep] {
        py::gil_scoped_acquire gil;
        (*keep)();
      },
      threshold);
}

// The chip's allocator statistics under torch.cuda.memory_stats' keys ("allocated_bytes.all.current" ...).
// Read here rather than through torch.accelerator, which on a CUDA build of torch answers for CUDA.
py::dict memory_stats(int index) {
  const auto stats = maia::allocator()->getDeviceStats(static_cast<c10::DeviceIndex>(index));
  py::dict out;
  const std::pair<const char*, const c10::CachingAllocator::StatArray*> arrays[] = {
      {"allocation", &stats.allocation},         {"segment", &stats.segment},
      {"active", &stats.active},                 {"allocated_bytes", &stats.allocated_bytes},
      {"reserved_bytes", &stats.reserved_bytes}, {"active_bytes", &stats.active_bytes},
      {"requested_bytes", &stats.requested_bytes}};
  for (const auto& [name, array] : arrays) {
    const auto& all = (*array)[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    const std::string prefix = std::string(name) + ".all.";
    out[py::str(prefix + "current")] = all.current;
    out[py::str(prefix + "peak")] = all.peak;
    out[py::str(prefix + "allocated")] = all.allocated;
    out[py::str(prefix + "freed")] = all.freed;
  }
  out["num_ooms"] = stats.num_ooms;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &maia::configure, "Chips of the node, each one's HBM in bytes, the chip's name.");
  m.def("configured", &maia::configured);
  m.def("device_count", []() { return static_cast<int>(maia::device_count()); });
  m.def("current_device", []() { return static_cast<int>(maia::current_device()); });
  m.def("set_device", [](int index) { maia::set_device(static_cast<c10::DeviceIndex>(index)); });
  m.def("memory_stats", &memory_stats);
  m.def("reset_peak", [](int index) { maia::allocator()->resetPeakStats(static_cast<c10::DeviceIndex>(index)); });
  m.def("reset_accumulated",
        [](int index) { maia::allocator()->resetAccumulatedStats(static_cast<c10::DeviceIndex>(index)); });
  m.def("memory_info", [](int index) { return maia::allocator()->getMemoryInfo(static_cast<c10::DeviceIndex>(index)); });
  m.def("use_copying_fallback", &maia::use_copying_fallback, "PyTorch's copying cpu_fallback (to compare).");
  m.def("drain", &drain, "(signatures first seen since the last drain, runs as bytes of (u32 id, i32 chip, i64 ns)).");
  m.def("on_full", &on_full, "Call ``flush`` when the log holds ``threshold`` events (None: never).");
}
