// 2-D float32 convolutions (NHWC activations, HWIO kernels) through oneDNN, exposed as XLA FFI
// handlers for `jax.ffi.ffi_call` (anode_jax/nn/onednn/__init__.py registers them).
//
// Three handlers, one per pass of a convolution y = conv(x, w) with window strides (sh, sw)
// and explicit padding (top, bottom, left, right):
//   AnodeOnednnConvForward     (x: N,H,W,C;  w: KH,KW,C,O) -> y: N,OH,OW,O
//   AnodeOnednnConvInputGrad   (dy: N,OH,OW,O; w: KH,KW,C,O) -> dx: N,H,W,C
//   AnodeOnednnConvWeightGrad  (x: N,H,W,C; dy: N,OH,OW,O) -> dw: KH,KW,C,O
// Creating a oneDNN primitive selects and JIT-compiles a kernel (milliseconds), so primitives
// are cached per geometry for the life of the process. Activations stay in NHWC (no reorder);
// the kernel layout is left to oneDNN ("any") and the HWIO kernel is reordered to and from it.

#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

// kind, N, H, W, C, KH, KW, O, OH, OW, sh, sw, top, bottom, left, right
using Key = std::array<int64_t, 16>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

struct Geometry {
  dnnl::memory::desc src, weights_any, weights_hwio, dst;
  dnnl::memory::dims strides, pad_l, pad_r;
};

Geometry MakeGeometry(const Key& k) {
  const int64_t n = k[1], h = k[2], w = k[3], c = k[4], kh = k[5], kw = k[6], o = k[7],
                oh = k[8], ow = k[9];
  Geometry g;
  g.src = dnnl::memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  g.dst = dnnl::memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc);
  g.weights_any = dnnl::memory::desc({o, c, kh, kw}, dt::f32, tag::any);
  g.weights_hwio = dnnl::memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
  g.strides = {k[10], k[11]};
  g.pad_l = {k[12], k[14]};
  // The right padding the output size actually uses (the caller's high padding may exceed
  // it by up to stride - 1 rows); oneDNN's kernels read it literally.
  g.pad_r = {(oh - 1) * k[10] + kh - h - k[12], (ow - 1) * k[11] + kw - w - k[14]};
  return g;
}

// XLA:CPU runs independent thunks (e.g. a convolution's two gradients) on different threads at
// once, and oneDNN's default build shares one library-owned scratchpad among all primitives;
// so every primitive gets its scratchpad from the caller (one per thread, below).
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src,
      g.weights_any, g.dst, g.strides, g.pad_l, g.pad_r, Attr());
}

// One cached primitive with the reorder between the caller's HWIO kernel and its own layout
// (absent when oneDNN chose HWIO itself).
struct Entry {
  dnnl::primitive conv;
  dnnl::memory::desc weights;  // the primitive's kernel layout
  bool reorder_needed = false;
  dnnl::reorder weights_reorder;  // HWIO -> primitive layout (forward, input grad) or back
  dnnl::memory::desc scratchpad, reorder_scratchpad;
  std::string impl;
};

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Entry>> cache;

std::shared_ptr<Entry> Build(const Key& k) {
  Geometry g = MakeGeometry(k);
  auto entry = std::make_shared<Entry>();
  auto fwd = ForwardDesc(g);
  if (k[0] == 0) {
    entry->conv = dnnl::convolution_forward(fwd);
    entry->weights = fwd.weights_desc();
    entry->impl = fwd.impl_info_str();
    entry->scratchpad = fwd.scratchpad_desc();
  } else if (k[0] == 1) {
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.src, g.weights_any, g.dst, g.strides,
        g.pad_l, g.pad_r, fwd, Attr());
    entry->conv = dnnl::convolution_backward_data(bwd);
    entry->weights = bwd.weights_desc();
    entry->impl = bwd.impl_info_str();
    entry->scratchpad = bwd.scratchpad_desc();
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.src, g.weights_any, g.dst, g.strides,
        g.pad_l, g.pad_r, fwd, Attr());
    entry->conv = dnnl::convolution_backward_weights(bwd);
    entry->weights = bwd.diff_weights_desc();
    entry->impl = bwd.impl_info_str();
    entry->scratchpad = bwd.scratchpad_desc();
  }
  entry->reorder_needed = entry->weights != g.weights_hwio;
  if (entry->reorder_needed) {
    auto pd = k[0] == 2 ? dnnl::reorder::primitive_desc(Engine(), entry->weights, Engine(),
                                                        g.weights_hwio, Attr())
                        : dnnl::reorder::primitive_desc(Engine(), g.weights_hwio, Engine(),
                                                        entry->weights, Attr());
    entry->weights_reorder = dnnl::reorder(pd);
    entry->reorder_scratchpad = pd.scratchpad_desc();
  }
  return entry;
}

std::shared_ptr<Entry> Lookup(const Key& k) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(k);
  if (it != cache.end()) return it->second;
  auto entry = Build(k);
  cache.emplace(k, entry);
  return entry;
}

ffi::Error CheckAttrs(ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  if (strides.size() != 2 || padding.size() != 4) {
    return ffi::Error::InvalidArgument(
        "onednn conv: window_strides needs 2 entries and padding 4 (top, bottom, left, right)");
  }
  return ffi::Error::Success();
}

template <typename D>
bool Rank4(const D& dims) {
  return dims.size() == 4;
}

Key MakeKey(int64_t kind, ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
            ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
            ffi::Span<const int64_t> padding) {
  return Key{kind, x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
             strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
}

// This thread's scratchpad memory for a primitive (grown as needed, never shrunk).
dnnl::memory Scratchpad(const dnnl::memory::desc& desc) {
  thread_local std::unique_ptr<char[]> buffer;
  thread_local size_t capacity = 0;
  size_t size = desc.get_size();
  if (size > capacity) {
    buffer.reset(new char[size]);
    capacity = size;
  }
  return dnnl::memory(desc, Engine(), buffer.get());
}

// One oneDNN call at a time: each already uses every core (its OpenMP team), so calls that
// XLA's threads issue at once would only compete for them.
std::mutex execute_mutex;

ffi::Error Run(int64_t kind, const Key& key, float* src, float* weights, float* dst) {
  try {
    auto entry = Lookup(key);
    std::lock_guard<std::mutex> lock(execute_mutex);
    Geometry g = MakeGeometry(key);
    auto& engine = Engine();
    auto& stream = Stream();
    dnnl::memory src_m(g.src, engine, src);
    dnnl::memory dst_m(g.dst, engine, dst);
    dnnl::memory hwio_m(g.weights_hwio, engine, weights);
    dnnl::memory weights_m = hwio_m;
    if (entry->reorder_needed) {
      weights_m = dnnl::memory(entry->weights, engine);
      if (kind != 2) {
        entry->weights_reorder.execute(stream, {{DNNL_ARG_FROM, hwio_m},
                                                {DNNL_ARG_TO, weights_m},
                                                {DNNL_ARG_SCRATCHPAD,
                                                 Scratchpad(entry->reorder_scratchpad)}});
      }
    }
    if (g.pad_r[0] < 0 || g.pad_r[1] < 0) {
      // The Python side crops the input to the rows/columns the windows read (oneDNN 3.2's
      // 1x1 weight gradient was wrong with a negative right padding).
      return ffi::Error::InvalidArgument(
          "onednn conv: the input extends past the last window; crop it first");
    }
    if (kind == 0) {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, src_m},
                                   {DNNL_ARG_WEIGHTS, weights_m},
                                   {DNNL_ARG_DST, dst_m},
                                   {DNNL_ARG_SCRATCHPAD, Scratchpad(entry->scratchpad)}});
    } else if (kind == 1) {
      entry->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m},
                                   {DNNL_ARG_WEIGHTS, weights_m},
                                   {DNNL_ARG_DIFF_DST, dst_m},
                                   {DNNL_ARG_SCRATCHPAD, Scratchpad(entry->scratchpad)}});
    } else {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, src_m},
                                   {DNNL_ARG_DIFF_WEIGHTS, weights_m},
                                   {DNNL_ARG_DIFF_DST, dst_m},
                                   {DNNL_ARG_SCRATCHPAD, Scratchpad(entry->scratchpad)}});
      if (entry->reorder_needed) {
        entry->weights_reorder.execute(stream, {{DNNL_ARG_FROM, weights_m},
                                                {DNNL_ARG_TO, hwio_m},
                                                {DNNL_ARG_SCRATCHPAD,
                                                 Scratchpad(entry->reorder_scratchpad)}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding) {
  if (auto err = CheckAttrs(strides, padding); err.failure()) return err;
  if (!Rank4(x.dimensions()) || !Rank4(w.dimensions()) || !Rank4(y->dimensions()))
    return ffi::Error::InvalidArgument("onednn conv: operands must be rank 4 (NHWC / HWIO)");
  Key key = MakeKey(0, x.dimensions(), w.dimensions(), y->dimensions(), strides, padding);
  return Run(0, key, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error InputGradImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> padding) {
  if (auto err = CheckAttrs(strides, padding); err.failure()) return err;
  if (!Rank4(dy.dimensions()) || !Rank4(w.dimensions()) || !Rank4(dx->dimensions()))
    return ffi::Error::InvalidArgument("onednn conv: operands must be rank 4 (NHWC / HWIO)");
  Key key = MakeKey(1, dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding);
  return Run(1, key, dx->typed_data(), w.typed_data(), dy.typed_data());
}

ffi::Error WeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> padding) {
  if (auto err = CheckAttrs(strides, padding); err.failure()) return err;
  if (!Rank4(x.dimensions()) || !Rank4(dy.dimensions()) || !Rank4(dw->dimensions()))
    return ffi::Error::InvalidArgument("onednn conv: operands must be rank 4 (NHWC / HWIO)");
  Key key = MakeKey(2, x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding);
  return Run(2, key, x.typed_data(), dw->typed_data(), dy.typed_data());
}

}  // namespace

#define ANODE_ONEDNN_BIND                                     \
  ffi::Ffi::Bind()                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                           \
      .Arg<ffi::Buffer<ffi::F32>>()                           \
      .Ret<ffi::Buffer<ffi::F32>>()                           \
      .Attr<ffi::Span<const int64_t>>("window_strides")       \
      .Attr<ffi::Span<const int64_t>>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AnodeOnednnConvForward, ForwardImpl, ANODE_ONEDNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AnodeOnednnConvInputGrad, InputGradImpl, ANODE_ONEDNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AnodeOnednnConvWeightGrad, WeightGradImpl, ANODE_ONEDNN_BIND);

// The kernel oneDNN picked for a geometry (kind 0 forward, 1 input grad, 2 weight grad), for
// benchmarks' records; builds the primitive if needed. Returns the length written (or needed).
extern "C" __attribute__((visibility("default"))) int AnodeOnednnImplInfo(const int64_t* key16, char* out, int size) {
  Key key;
  for (int i = 0; i < 16; ++i) key[i] = key16[i];
  std::string impl;
  try {
    impl = Lookup(key)->impl;
  } catch (const dnnl::error& e) {
    impl = std::string("error: ") + e.what();
  }
  int n = static_cast<int>(impl.size());
  for (int i = 0; i < size - 1 && i < n; ++i) out[i] = impl[i];
  if (size > 0) out[n < size - 1 ? n : size - 1] = '\0';
  return n;
}
