// Chips, HBM accounting, device guard, hooks and generator for PrivateUse1 renamed "maia".
// The memory is the host's; what makes it a device's is that every byte is counted against the chip
// that holds it and refused past the profile's HBM, as a real allocator refuses past the card's.
#include "runtime.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace maia {
namespace {

using c10::CachingDeviceAllocator::DeviceStats;
constexpr size_t kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

struct Chip {
  std::mutex mutex;
  DeviceStats stats;
};

struct Node {
  int64_t hbm_bytes = 0;
  std::string chip_name;
  std::vector<bool> refused = std::vector<bool>(static_cast<size_t>(c10::ScalarType::NumOptions), false);
  std::string refusal;
  std::vector<std::unique_ptr<Chip>> chips;
};

Node& node() {
  static Node n;
  return n;
}

thread_local c10::DeviceIndex t_current = 0;

// Binary units as maia_serving.formats.units.format_bytes writes them: "64.00 GiB", "600.00 KiB".
std::string gib(int64_t bytes) {
  char buf[32];
  const char* units[] = {"TiB", "GiB", "MiB", "KiB"};
  for (int i = 0; i < 4; ++i) {
    const double scale = static_cast<double>(int64_t{1} << (10 * (4 - i)));
    if (static_cast<double>(bytes) >= scale) {
      std::snprintf(buf, sizeof(buf), "%.2f %s", static_cast<double>(bytes) / scale, units[i]);
      return buf;
    }
  }
  std::snprintf(buf, sizeof(buf), "%lld B", static_cast<long long>(bytes));
  return buf;
}

Chip& chip(c10::DeviceIndex index) {
  check_index(index);
  return *node().chips[index];
}

// Counts ``bytes`` on chip ``index``, or raises torch.OutOfMemoryError as CUDA's allocator words it.
void charge(c10::DeviceIndex index, size_t bytes) {
  Chip& c = chip(index);
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t in_use = c.stats.allocated_bytes[kAll].current;
  if (in_use + static_cast<int64_t>(bytes) > node().hbm_bytes) {
    c.stats.num_ooms += 1;
    TORCH_CHECK_WITH(
        OutOfMemoryError, false, "Maia out of memory. Tried to allocate ", gib(bytes), ". maia:", int(index), " (",
        node().chip_name, ") has a total capacity of ", gib(node().hbm_bytes), " of which ",
        gib(node().hbm_bytes - in_use), " is free. ", gib(in_use),
        " is allocated by PyTorch. Free tensors (del, then torch.maia.empty_cache()), use a smaller batch, "
        "or emulate a chip with more HBM (MAIA_SERVING_PROFILE or maia_serving.torch.set_profile before first use).");
  }
  for (auto* stat : {&c.stats.allocated_bytes, &c.stats.reserved_bytes, &c.stats.active_bytes, &c.stats.requested_bytes}) {
    (*stat)[kAll].increase(bytes);
  }
  for (auto* stat : {&c.stats.allocation, &c.stats.segment, &c.stats.active}) {
    (*stat)[kAll].increase(1);
  }
}

void uncharge(c10::DeviceIndex index, size_t bytes) {
  Chip& c = *node().chips[index];
  std::lock_guard<std::mutex> lock(c.mutex);
  for (auto* stat : {&c.stats.allocated_bytes, &c.stats.reserved_bytes, &c.stats.active_bytes, &c.stats.requested_bytes}) {
    (*stat)[kAll].decrease(bytes);
  }
  for (auto* stat : {&c.stats.allocation, &c.stats.segment, &c.stats.active}) {
    (*stat)[kAll].decrease(1);
  }
}

// What a maia DataPtr's context holds: the bytes it charged, and, for memory a CPU kernel allocated
// and maia adopted, the CPU storage that owns it.
struct Block {
  void* data;
  size_t bytes;
  c10::DeviceIndex device;
  c10::Storage host;  // empty when maia allocated the memory itself
};

void release(void* context) {
  auto* block = static_cast<Block*>(context);
  uncharge(block->device, block->bytes);
  if (!block->host) {
    c10::free_cpu(block->data);
  }
  delete block;
}

class MaiaAllocator final : public c10::DeviceAllocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const c10::DeviceIndex index = current_device();
    charge(index, bytes);
    void* data = bytes ? c10::alloc_cpu(bytes) : nullptr;
    return {data, new Block{data, bytes, index, {}}, &release, c10::Device(kMaia, index)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  bool initialized() override { return configured(); }
  // Nothing is cached: freed memory goes back at once, so emptying the cache has nothing to return.
  void emptyCache(c10::MempoolId_t) override {}
  void recordStream(const c10::DataPtr&, c10::Stream) override {}

  DeviceStats getDeviceStats(c10::DeviceIndex index) override {
    Chip& c = chip(index);
    std::lock_guard<std::mutex> lock(c.mutex);
    return c.stats;
  }

  void resetAccumulatedStats(c10::DeviceIndex index) override {
    Chip& c = chip(index);
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto* stat : {&c.stats.allocation, &c.stats.segment, &c.stats.active, &c.stats.allocated_bytes,
                       &c.stats.reserved_bytes, &c.stats.active_bytes, &c.stats.requested_bytes}) {
      (*stat)[kAll].reset_accumulated();
    }
    c.stats.num_ooms = 0;
  }

  void resetPeakStats(c10::DeviceIndex index) override {
    Chip& c = chip(index);
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto* stat : {&c.stats.allocation, &c.stats.segment, &c.stats.active, &c.stats.allocated_bytes,
                       &c.stats.reserved_bytes, &c.stats.active_bytes, &c.stats.requested_bytes}) {
      (*stat)[kAll].reset_peak();
    }
  }

  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex index) override {
    Chip& c = chip(index);
    std::lock_guard<std::mutex> lock(c.mutex);
    const int64_t total = node().hbm_bytes;
    return {static_cast<size_t>(total - c.stats.allocated_bytes[kAll].current), static_cast<size_t>(total)};
  }
};

MaiaAllocator g_allocator;

class MaiaGuard final : public c10::impl::DeviceGuardImplInterface {
 public:
  c10::DeviceType type() const override { return kMaia; }
  c10::Device exchangeDevice(c10::Device d) const override {
    const auto old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return {kMaia, current_device()}; }
  void setDevice(c10::Device d) const override { set_device(d.index()); }
  void uncheckedSetDevice(c10::Device d) const noexcept override { t_current = d.index(); }
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const override { return c10::Stream(c10::Stream::DEFAULT, s.device()); }
  c10::DeviceIndex deviceCount() const noexcept override { return device_count(); }
  // Every operator has finished when it returns (the host ran it): nothing to wait for.
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, MaiaGuard);

// A CPU generator that answers as a maia one: random operators run on the host's kernels.
class MaiaGenerator : public at::CPUGeneratorImpl {
 public:
  explicit MaiaGenerator(c10::DeviceIndex index) {
    device_ = c10::Device(kMaia, index);
    key_set_ = c10::DispatchKeySet(c10::DispatchKey::PrivateUse1);
  }
};

const at::Generator& default_generator(c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<at::Generator>> generators(64);
  const c10::DeviceIndex i = index < 0 ? current_device() : index;
  check_index(i);
  std::lock_guard<std::mutex> lock(mutex);
  if (!generators[i]) {
    generators[i] = std::make_unique<at::Generator>(at::make_generator<MaiaGenerator>(i));
    generators[i]->set_current_seed(c10::default_rng_seed_val);
  }
  return *generators[i];
}

struct MaiaHooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return device_count() > 0; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return device_count(); }
  void setCurrentDevice(c10::DeviceIndex index) const override { set_device(index); }
  c10::DeviceIndex getCurrentDevice() const override { return current_device(); }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex index) const override {
    const auto old = current_device();
    set_device(index);
    return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex index) const override { return exchangeDevice(index); }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex index) const override { return default_generator(index); }
  at::Generator getNewGenerator(c10::DeviceIndex index) const override {
    return at::make_generator<MaiaGenerator>(index < 0 ? current_device() : index);
  }
  at::Device getDeviceFromPtr(void*) const override { return {kMaia, current_device()}; }
  bool isPinnedPtr(const void*) const override { return false; }
  at::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const override {
    const c10::DeviceGuard guard(storage.device());
    c10::DataPtr fresh = g_allocator.allocate(bytes);
    const size_t keep = std::min(bytes, storage.nbytes());
    if (keep) {
      std::memcpy(fresh.get(), storage.data(), keep);
    }
    storage.unsafeGetStorageImpl()->set_data_ptr_noswap(std::move(fresh));
    storage.unsafeGetStorageImpl()->set_nbytes(bytes);
  }
};

[[maybe_unused]] const bool g_registered = [] {
  c10::SetAllocator(kMaia, &g_allocator);
  at::RegisterPrivateUse1HooksInterface(new MaiaHooks());
  return true;
}();

}  // namespace

// The node may change while it holds no tensor (a test, or a user comparing profiles in one process).
bool holds_tensors(const Node& n) {
  for (const auto& c : n.chips) {
    std::lock_guard<std::mutex> lock(c->mutex);
    if (c->stats.allocation[kAll].current > 0) {
      return true;
    }
  }
  return false;
}

void configure(int chips, int64_t hbm_bytes, const std::string& chip_name, const std::vector<std::string>& refused,
               const std::string& refusal) {
  Node& n = node();
  for (size_t i = 0; i < n.refused.size(); ++i) {
    const std::string name = c10::toString(static_cast<c10::ScalarType>(i));
    n.refused[i] = std::find(refused.begin(), refused.end(), name) != refused.end();
  }
  n.refusal = refusal;
  TORCH_CHECK(chips > 0 && chips <= 64, "maia: a node of ", chips, " chips is not supported (1 to 64)");
  TORCH_CHECK(hbm_bytes > 0, "maia: HBM capacity must be positive, got ", hbm_bytes);
  if (static_cast<int>(n.chips.size()) == chips && n.hbm_bytes == hbm_bytes && n.chip_name == chip_name) {
    return;
  }
  TORCH_CHECK(!holds_tensors(n), "maia: this process holds maia tensors on its ", n.chips.size(), " x ", n.chip_name,
              " node; free them (del, then torch.maia.empty_cache()) before choosing another profile, or choose it "
              "(maia_serving.torch.set_profile or MAIA_SERVING_PROFILE) before the first maia tensor");
  n.hbm_bytes = hbm_bytes;
  n.chip_name = chip_name;
  n.chips.clear();
  for (int i = 0; i < chips; ++i) {
    n.chips.push_back(std::make_unique<Chip>());
  }
}

bool configured() { return !node().chips.empty(); }

void check_dtype(c10::ScalarType dtype, const std::string& op) {
  const Node& n = node();
  TORCH_CHECK(!n.refused[static_cast<size_t>(dtype)], op, " in ", c10::toString(dtype), " on maia: the ",
                   n.chip_name, " has no ", c10::toString(dtype), " matrix units; ", n.refusal);
}

c10::DeviceIndex device_count() { return static_cast<c10::DeviceIndex>(node().chips.size()); }

c10::DeviceIndex current_device() { return t_current; }

void check_index(c10::DeviceIndex index) {
  TORCH_CHECK(configured(), "maia: the device is not set up; `import maia_serving.torch` sets it up");
  TORCH_CHECK_INDEX(
      index >= 0 && index < device_count(), "maia:", int(index), " does not exist: the emulated ",
      node().chip_name, " node has ", int(device_count()), " chip(s), maia:0 to maia:", int(device_count() - 1));
}

void set_device(c10::DeviceIndex index) {
  check_index(index);
  t_current = index;
}

c10::DeviceAllocator* allocator() { return &g_allocator; }

namespace {
void release_alias(void* context) { delete static_cast<c10::Storage*>(context); }
}  // namespace

c10::Storage host_storage(const c10::Storage& maia) {
  auto* keep = new c10::Storage(maia);
  c10::DataPtr data(maia.mutable_data(), keep, &release_alias, c10::Device(c10::kCPU));
  // Resizable through the CPU allocator: a CPU kernel that grows an out= argument reallocates here,
  // and the fallback moves the new memory into the maia storage.
  return c10::Storage(c10::Storage::use_byte_size_t(), maia.nbytes(), std::move(data), c10::GetCPUAllocator(), true);
}

at::Tensor on_storage(const c10::Storage& storage, const at::Tensor& like, c10::DispatchKey key) {
  auto out = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage), c10::DispatchKeySet(key), like.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  return out;
}

at::Tensor host_alias(const at::Tensor& maia) {
  return on_storage(host_storage(maia.storage()), maia, c10::DispatchKey::CPU);
}

at::Tensor on_host(const at::Tensor& t) { return t.defined() && t.device().type() == kMaia ? host_alias(t) : t; }

void join_chip(std::optional<c10::DeviceIndex>& chip, c10::DeviceIndex index, const std::string& op) {
  TORCH_CHECK(!chip || *chip == index, op, " on maia: its tensors are on maia:", int(*chip), " and maia:", int(index),
              ". An operator runs on one chip; move one with .to(\"maia:", int(*chip), "\") first.");
  chip = index;
}

c10::DataPtr adopt_data(const c10::Storage& host, c10::DeviceIndex device) {
  const size_t bytes = host.nbytes();
  charge(device, bytes);
  auto* block = new Block{host.mutable_data(), bytes, device, host};
  return c10::DataPtr(block->data, block, &release, c10::Device(kMaia, device));
}

c10::Storage adopt_storage(const c10::Storage& host, c10::DeviceIndex device) {
  const size_t bytes = host.nbytes();
  return c10::Storage(c10::Storage::use_byte_size_t(), bytes, adopt_data(host, device), &g_allocator, true);
}

at::Tensor adopt(const at::Tensor& host, c10::DeviceIndex device) {
  return on_storage(adopt_storage(host.storage(), device), host, c10::DispatchKey::PrivateUse1);
}

}  // namespace maia
