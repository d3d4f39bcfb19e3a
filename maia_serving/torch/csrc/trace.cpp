#include "trace.h"

#include <exception>
#include <mutex>

namespace maia {
namespace {

struct Log {
  std::mutex mutex;
  std::vector<Event> events;
  std::function<void()> flush;
  size_t threshold = 0;
};

Log& log() {
  static Log l;
  return l;
}

}  // namespace

Meta meta_of(const at::Tensor& t) {
  Meta m;
  if (!t.defined()) {
    return m;
  }
  m.sizes = t.sizes().vec();
  m.strides = t.strides().vec();
  m.offset = t.storage_offset();
  m.dtype = static_cast<int8_t>(t.scalar_type());
  m.device = t.device().is_cpu() ? -1 : static_cast<int8_t>(t.device().index());
  return m;
}

Arg arg_of(const c10::IValue& v) {
  if (v.isTensor()) {
    return meta_of(v.toTensor());
  }
  if (v.isTensorList()) {
    std::vector<Meta> out;
    for (const at::Tensor& t : v.toTensorVector()) {
      out.push_back(meta_of(t));
    }
    return out;
  }
  if (v.isBool()) {
    return v.toBool();
  }
  if (v.isInt()) {
    return v.toInt();
  }
  if (v.isDouble()) {
    return v.toDouble();
  }
  if (v.isIntList()) {
    return v.toIntVector();
  }
  return std::monostate{};
}

void record(Event&& event) {
  std::function<void()> flush;
  {
    Log& l = log();
    std::lock_guard<std::mutex> lock(l.mutex);
    l.events.push_back(std::move(event));
    if (l.flush && l.events.size() >= l.threshold) {
      flush = l.flush;
    }
  }
  if (flush) {
    flush();
  }
}

std::vector<Event> drain() {
  Log& l = log();
  std::lock_guard<std::mutex> lock(l.mutex);
  std::vector<Event> out;
  out.swap(l.events);
  return out;
}

void on_full(std::function<void()> flush, size_t threshold) {
  Log& l = log();
  std::lock_guard<std::mutex> lock(l.mutex);
  l.flush = std::move(flush);
  l.threshold = threshold;
}

Span::Span(std::string op, c10::DeviceIndex device)
    : start_(std::chrono::steady_clock::now()), uncaught_(std::uncaught_exceptions()) {
  event_.op = std::move(op);
  event_.device = static_cast<int8_t>(device);
}

void Span::copy(const at::Tensor& src, const at::Tensor& dst) const {
  event_.args = {meta_of(src), meta_of(dst)};
  event_.outputs = {meta_of(dst)};
}

Span::~Span() {
  if (std::uncaught_exceptions() > uncaught_) {
    return;
  }
  event_.host_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count();
  try {
    record(std::move(event_));
  } catch (...) {  // a destructor must not throw; a lost event only loses its price
  }
}

}  // namespace maia
