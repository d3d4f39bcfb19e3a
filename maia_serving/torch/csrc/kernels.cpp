// The operators no fallback can reach: convolution (an out-of-tree device is sent to
// convolution_overrideable, which fails unless the device implements it) and its backward; and the
// fused scaled-dot-product attention, registered so that attention is one priced operator rather than a
// bmm / softmax / bmm chain. Each runs the host's CPU kernel on maia memory, as the fallback does.
#include "runtime.h"
#include "trace.h"

#include <ATen/SDPBackend.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/transformers/attention.h>
#include <torch/library.h>

namespace maia {
namespace {

using maia::on_host;  // the optional overload below would hide runtime.h's
std::optional<at::Tensor> on_host(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(on_host(*t)) : std::nullopt;
}
at::Tensor on_chip(const at::Tensor& t, c10::DeviceIndex device) {
  return t.defined() && t.is_cpu() ? adopt(t, device) : t;
}

c10::DeviceIndex chip_of(std::initializer_list<const at::Tensor*> tensors, const char* op) {
  std::optional<c10::DeviceIndex> device;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->device().type() == kMaia) {
      join_chip(device, t->device().index(), op);
    }
  }
  return device ? *device : current_device();
}

Meta meta_opt(const std::optional<at::Tensor>& t) { return t ? meta_of(*t) : Meta{}; }

at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
                       bool transposed, c10::SymIntArrayRef output_padding, c10::SymInt groups) {
  const auto device = chip_of({&input, &weight}, "convolution");
  check_dtype(input.scalar_type(), "aten::convolution");
  Span span("aten::convolution", device);
  // FP8 E4M3/E5M2 operands (maia_serving.tools.fp8_model): the chip's FP8 convolution accumulates in FP32 and
  // writes BF16, its caller applying the scales; the host has no FP8 convolution, so it computes in FP32. The
  // record keeps the FP8 operands: the convolution is priced at the FP8 peak, its operands at a byte each.
  const bool fp8 = c10::isFloat8Type(input.scalar_type());
  TORCH_CHECK(!fp8 || !(bias && bias->defined()),
              "aten::convolution in FP8 on maia: add the bias after the scales, not in the call");
  auto host_input = fp8 ? on_host(input).to(at::kFloat) : on_host(input);
  auto host_weight = fp8 ? on_host(weight).to(at::kFloat) : on_host(weight);
  auto out = at::convolution_symint(host_input, host_weight, on_host(bias), stride, padding, dilation, transposed,
                                    output_padding, groups);
  out = on_chip(fp8 ? out.to(at::kBFloat16) : out, device);
  span.args({meta_of(input), meta_of(weight), meta_opt(bias), C10_AS_INTARRAYREF_SLOW(stride).vec(),
             C10_AS_INTARRAYREF_SLOW(padding).vec(), C10_AS_INTARRAYREF_SLOW(dilation).vec(), transposed,
             C10_AS_INTARRAYREF_SLOW(output_padding).vec(), groups.expect_int()});
  span.outputs({meta_of(out)});
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::array<bool, 3> output_mask) {
  const auto device = chip_of({&grad_output, &input, &weight}, "convolution_backward");
  Span span("aten::convolution_backward", device);
  std::optional<c10::SymIntArrayRef> bias_sizes;
  std::vector<c10::SymInt> bias_size;
  if (output_mask[2]) {
    bias_size.push_back(transposed ? weight.sym_size(1) * groups : weight.sym_size(0));
    bias_sizes = bias_size;
  }
  auto [gi, gw, gb] =
      at::convolution_backward_symint(on_host(grad_output), on_host(input), on_host(weight), bias_sizes, stride,
                                      padding, dilation, transposed, output_padding, groups, output_mask);
  gi = on_chip(gi, device);
  gw = on_chip(gw, device);
  gb = on_chip(gb, device);
  span.args({meta_of(grad_output), meta_of(input), meta_of(weight),
             bias_size.empty() ? Arg{} : Arg{std::vector<int64_t>{bias_size[0].expect_int()}},
             C10_AS_INTARRAYREF_SLOW(stride).vec(), C10_AS_INTARRAYREF_SLOW(padding).vec(),
             C10_AS_INTARRAYREF_SLOW(dilation).vec(), transposed, C10_AS_INTARRAYREF_SLOW(output_padding).vec(),
             groups.expect_int(), std::vector<int64_t>{output_mask[0], output_mask[1], output_mask[2]}});
  span.outputs({meta_of(gi), meta_of(gw), meta_of(gb)});
  return {gi, gw, gb};
}

// Attention: the fused kernel whenever the host's flash kernel can run it (no dropout); otherwise the
// math decomposition, priced operator by operator.
int64_t sdp_choice(const at::Tensor& query, const at::Tensor& key, const at::Tensor&,
                   const std::optional<at::Tensor>&, double dropout_p, bool, std::optional<double>, bool) {
  const bool fused = dropout_p == 0.0 && query.dim() == 4 && key.dim() == 4 && query.size(1) % key.size(1) == 0;
  return static_cast<int64_t>(fused ? at::SDPBackend::overrideable : at::SDPBackend::math);
}

// Grouped-query attention: the host kernel wants as many key/value heads as query heads.
at::Tensor widen(const at::Tensor& kv, int64_t heads) {
  const int64_t group = heads / kv.size(1);
  return group == 1 ? kv : kv.repeat_interleave(group, 1);
}
at::Tensor narrow_grad(const at::Tensor& grad, int64_t kv_heads) {
  const int64_t group = grad.size(1) / kv_heads;
  if (group == 1) {
    return grad;
  }
  auto sizes = grad.sizes().vec();
  sizes[1] = kv_heads;
  sizes.insert(sizes.begin() + 2, group);
  return grad.view(sizes).sum(2);
}

using FusedOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::SymInt, c10::SymInt, at::Tensor,
                            at::Tensor, at::Tensor>;

FusedOut sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
              const std::optional<at::Tensor>& attn_bias, double dropout_p, bool is_causal, bool,
              std::optional<double> scale) {
  const auto device = chip_of({&query, &key, &value}, "scaled_dot_product_attention");
  check_dtype(query.scalar_type(), "aten::scaled_dot_product_attention");
  Span span("aten::_scaled_dot_product_fused_attention_overrideable", device);
  const int64_t heads = query.size(1);
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      on_host(query), widen(on_host(key), heads), widen(on_host(value), heads), dropout_p, is_causal,
      on_host(attn_bias), scale);
  out = on_chip(out, device);
  lse = on_chip(lse, device);
  auto none = at::empty({0}, query.options().dtype(at::kLong));
  span.args({meta_of(query), meta_of(key), meta_of(value), meta_opt(attn_bias), dropout_p, is_causal});
  span.outputs({meta_of(out), meta_of(lse)});
  return {out, lse, none, none, c10::SymInt(query.size(2)), c10::SymInt(key.size(2)), none, none, none};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& attn_bias, std::array<bool, 4>, const at::Tensor& out, const at::Tensor& logsumexp,
    const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt, double dropout_p, bool is_causal,
    const at::Tensor&, const at::Tensor&, std::optional<double> scale) {
  const auto device = chip_of({&grad_out, &query, &key, &value}, "scaled_dot_product_attention backward");
  Span span("aten::_scaled_dot_product_fused_attention_overrideable_backward", device);
  const int64_t heads = query.size(1);
  std::optional<at::Tensor> mask;
  if (attn_bias.defined()) {
    mask = on_host(attn_bias);
  }
  auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      on_host(grad_out), on_host(query), widen(on_host(key), heads), widen(on_host(value), heads), on_host(out),
      on_host(logsumexp), dropout_p, is_causal, mask, scale);
  gq = on_chip(gq, device);
  gk = on_chip(narrow_grad(gk, key.size(1)), device);
  gv = on_chip(narrow_grad(gv, value.size(1)), device);
  span.args({meta_of(grad_out), meta_of(query), meta_of(key), meta_of(value), meta_of(attn_bias), dropout_p,
             is_causal});
  span.outputs({meta_of(gq), meta_of(gk), meta_of(gv)});
  return {gq, gk, gv, at::Tensor()};
}

// FP8 E4M3 codes of x and their per-tensor scale (its absolute maximum over 448; 1 where all are zero), as
// vLLM's dynamic per-tensor FP8 quantization runs it: one kernel reduces to the scale, a second writes the codes;
// each is recorded as what it reads and writes. Computed in FP32 on the host.
std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x) {
  const auto device = chip_of({&x}, "quantize_fp8");
  const auto host = on_host(x).to(at::kFloat);
  at::Tensor scale;
  {
    Span span("maia::fp8_amax", device);
    const auto amax = host.abs().max();
    scale = on_chip(at::where(amax > 0, amax / 448.0, at::ones_like(amax)), device);
    span.args({meta_of(x)});
    span.outputs({meta_of(scale)});
  }
  Span span("maia::fp8_quantize", device);
  auto codes = on_chip((host / on_host(scale)).to(at::kFloat8_e4m3fn), device);
  span.args({meta_of(x), meta_of(scale)});
  span.outputs({meta_of(codes)});
  return {codes, scale};
}

}  // namespace

TORCH_LIBRARY(maia_fp8, m) { m.def("quantize(Tensor x) -> (Tensor codes, Tensor scale)"); }

TORCH_LIBRARY_IMPL(maia_fp8, PrivateUse1, m) { m.impl("quantize", quantize_fp8); }

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("convolution_overrideable", convolution);
  m.impl("convolution_backward_overrideable", convolution_backward);
  m.impl("_scaled_dot_product_fused_attention_overrideable", sdpa);
  m.impl("_scaled_dot_product_fused_attention_overrideable_backward", sdpa_backward);
}

}  // namespace maia

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &maia::sdp_choice)
}  // namespace at::native
