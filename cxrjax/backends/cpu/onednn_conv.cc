// oneDNN 2-D convolutions (forward, input gradient, weight gradient) as one XLA FFI
// custom call for JAX's CPU backend. Built on first use by cxrjax/backends/cpu/onednn.py
// against the libdnnl.so.3 of the `onednn-cpu-gomp` wheel (oneDNN 3.x, GNU OpenMP).
//
// Layouts are JAX's: activations NHWC, kernels HWIO, all row-major. They are given
// to oneDNN as strided memory descriptors; kernels are reordered to the layout the
// chosen implementation asks for (and back, for the weight gradient).
//
// The wheel ships no headers, so the few C API declarations used are written out
// below. Their values are oneDNN 3.x's ABI (include/oneapi/dnnl/dnnl_types.h,
// dnnl_common_types.h); load() checks the major version, and the tests compare every
// pass against XLA's convolution.
#include <sys/mman.h>

#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

extern "C" {
typedef int dnnl_status_t;
typedef int64_t dnnl_dims_t[12];
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;
typedef struct {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
} dnnl_version_t;

const dnnl_version_t* dnnl_version(void);
dnnl_status_t dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t);
dnnl_status_t dnnl_memory_desc_create_with_strides(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims,
                                                   int data_type, const dnnl_dims_t strides);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims,
                                               int data_type, int tag);
dnnl_status_t dnnl_memory_desc_clone(dnnl_memory_desc_t*, const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t, void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t, int what, int index);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t*, const_dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_execute(dnnl_primitive_t, dnnl_stream_t, int nargs, const dnnl_exec_arg_t* args);
dnnl_status_t dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l,
    const dnnl_dims_t padding_r, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint_fwd_pd, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides, const dnnl_dims_t dilates,
    const dnnl_dims_t padding_l, const dnnl_dims_t padding_r, const_dnnl_primitive_desc_t hint_fwd_pd,
    const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_batch_normalization_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, const_dnnl_memory_desc_t src, const_dnnl_memory_desc_t dst,
    float epsilon, unsigned flags, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_batch_normalization_backward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t diff_dst, const_dnnl_memory_desc_t src, float epsilon, unsigned flags,
    const_dnnl_primitive_desc_t hint_fwd_pd, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t*, const_dnnl_memory_desc_t src,
                                                 dnnl_engine_t, const_dnnl_memory_desc_t dst, dnnl_engine_t,
                                                 const_dnnl_primitive_attr_t);
}

namespace {

namespace ffi = xla::ffi;

// oneDNN 3.x ABI values.
constexpr int kSuccess = 0;
constexpr int kF32 = 3, kU8 = 6;
constexpr int kFormatAny = 1;
constexpr int kCpu = 1;
constexpr unsigned kInOrder = 1;
constexpr int kForwardTraining = 64, kBackward = 128;
constexpr int kConvolutionDirect = 1;
constexpr int kScratchpadUser = 1;
constexpr int kQueryWeightsMd = 131, kQueryDiffWeightsMd = 132, kQueryWorkspaceMd = 135, kQueryScratchpadMd = 136;
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80;
constexpr int kArgMean = 49, kArgVariance = 50, kArgScale = 51, kArgShift = 52, kArgWorkspace = 64;
constexpr int kArgDiffSrc = 129, kArgDiffDst = 145, kArgDiffWeights = 161, kArgDiffScale = 255, kArgDiffShift = 256;
constexpr unsigned kUseScale = 0x2, kUseShift = 0x4, kFuseNormRelu = 0x8;  // dnnl_normalization_flags_t
constexpr int kArgFrom = kArgSrc, kArgTo = kArgDst;

void check(dnnl_status_t s, const char* what) {
  if (s != kSuccess) throw std::runtime_error(std::string(what) + " failed with oneDNN status " + std::to_string(s));
}
#define CHECK(expr) check((expr), #expr)

dnnl_engine_t engine() {
  static dnnl_engine_t e = [] {
    dnnl_engine_t out;
    CHECK(dnnl_engine_create(&out, kCpu, 0));
    return out;
  }();
  return e;
}

dnnl_stream_t stream() {  // one per calling thread, created on first use
  thread_local dnnl_stream_t s = [] {
    dnnl_stream_t out;
    CHECK(dnnl_stream_create(&out, engine(), kInOrder));
    return out;
  }();
  return s;
}

dnnl_memory_desc_t strided(std::vector<int64_t> dims, std::vector<int64_t> strides, int type = kF32) {
  dnnl_dims_t d = {}, s = {};
  for (size_t i = 0; i < dims.size(); ++i) d[i] = dims[i], s[i] = strides[i];
  dnnl_memory_desc_t md;
  CHECK(dnnl_memory_desc_create_with_strides(&md, static_cast<int>(dims.size()), d, type, s));
  return md;
}

// oneDNN's logical order is (N, C, H, W) for activations and (O, I, H, W) for kernels.
dnnl_memory_desc_t nhwc(int64_t n, int64_t h, int64_t w, int64_t c) {
  return strided({n, c, h, w}, {h * w * c, 1, w * c, c});
}
// JAX's [kh, kw, i / groups, o] kernel as oneDNN's OIHW, or GOIHW with groups > 1
// (group g's outputs are o / groups consecutive channels of the last axis).
dnnl_memory_desc_t hwio(int64_t kh, int64_t kw, int64_t i, int64_t o, int64_t groups) {
  const int64_t ig = i / groups, og = o / groups;
  if (groups == 1) return strided({o, i, kh, kw}, {1, o, kw * i * o, i * o});
  return strided({groups, og, ig, kh, kw}, {og, 1, o, kw * ig * o, ig * o});
}

struct Geometry {
  int64_t kind, n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, groups;
  auto key() const { return std::tie(kind, n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, groups); }
  bool operator<(const Geometry& other) const { return key() < other.key(); }
};

// Primitives for one geometry and pass, created once and kept for the process.
struct Plan {
  dnnl_primitive_t conv = nullptr, reorder = nullptr;
  dnnl_memory_desc_t x = nullptr, y = nullptr, user_w = nullptr, kernel_w = nullptr;
  size_t conv_scratch = 0, reorder_scratch = 0, kernel_w_bytes = 0;
};

size_t scratch_bytes(const_dnnl_primitive_desc_t pd) {
  return dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(pd, kQueryScratchpadMd, 0));
}

std::unique_ptr<Plan> make_plan(const Geometry& g) {
  auto plan = std::make_unique<Plan>();
  dnnl_dims_t strides = {g.sh, g.sw}, dilates = {0, 0}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  plan->x = nhwc(g.n, g.h, g.w, g.c);
  plan->y = nhwc(g.n, g.oh, g.ow, g.o);
  plan->user_w = hwio(g.kh, g.kw, g.c, g.o, g.groups);
  dnnl_dims_t wdims = {g.o, g.c, g.kh, g.kw}, gwdims = {g.groups, g.o / g.groups, g.c / g.groups, g.kh, g.kw};
  dnnl_memory_desc_t any_w;
  if (g.groups == 1)
    CHECK(dnnl_memory_desc_create_with_tag(&any_w, 4, wdims, kF32, kFormatAny));
  else
    CHECK(dnnl_memory_desc_create_with_tag(&any_w, 5, gwdims, kF32, kFormatAny));
  // User scratchpads, so that calls can share the buffers below, kept outside the malloc heap.
  dnnl_primitive_attr_t attr;
  CHECK(dnnl_primitive_attr_create(&attr));
  CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser));
  dnnl_primitive_desc_t fwd, pd;
  CHECK(dnnl_convolution_forward_primitive_desc_create(&fwd, engine(), kForwardTraining, kConvolutionDirect,
                                                       plan->x, any_w, nullptr, plan->y, strides, dilates,
                                                       pad_l, pad_r, attr));
  pd = fwd;
  if (g.kind == 1) {
    CHECK(dnnl_convolution_backward_data_primitive_desc_create(&pd, engine(), kConvolutionDirect, plan->x, any_w,
                                                               plan->y, strides, dilates, pad_l, pad_r, fwd, attr));
  } else if (g.kind == 2) {
    CHECK(dnnl_convolution_backward_weights_primitive_desc_create(&pd, engine(), kConvolutionDirect, plan->x,
                                                                  any_w, nullptr, plan->y, strides, dilates, pad_l,
                                                                  pad_r, fwd, attr));
  }
  CHECK(dnnl_memory_desc_clone(
      &plan->kernel_w, dnnl_primitive_desc_query_md(pd, g.kind == 2 ? kQueryDiffWeightsMd : kQueryWeightsMd, 0)));
  plan->kernel_w_bytes = dnnl_memory_desc_get_size(plan->kernel_w);
  plan->conv_scratch = scratch_bytes(pd);
  CHECK(dnnl_primitive_create(&plan->conv, pd));
  if (!dnnl_memory_desc_equal(plan->kernel_w, plan->user_w)) {
    dnnl_primitive_desc_t rpd;
    bool back = g.kind == 2;  // the weight gradient comes out in the kernel's layout
    CHECK(dnnl_reorder_primitive_desc_create(&rpd, back ? plan->kernel_w : plan->user_w, engine(),
                                             back ? plan->user_w : plan->kernel_w, engine(), attr));
    plan->reorder_scratch = scratch_bytes(rpd);
    CHECK(dnnl_primitive_create(&plan->reorder, rpd));
    dnnl_primitive_desc_destroy(rpd);
  }
  if (pd != fwd) dnnl_primitive_desc_destroy(pd);
  dnnl_primitive_desc_destroy(fwd);
  dnnl_primitive_attr_destroy(attr);
  dnnl_memory_desc_destroy(any_w);
  return plan;
}

struct Memory {  // a oneDNN view of a buffer it does not own
  dnnl_memory_t m = nullptr;
  Memory(const_dnnl_memory_desc_t md, void* data) { CHECK(dnnl_memory_create(&m, md, engine(), data)); }
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;
  ~Memory() { dnnl_memory_destroy(m); }
};

// A growable, page-aligned byte buffer mapped outside the malloc heap. Calls are
// serialised (below), so each of the three buffers is reused by every call: no
// allocation per call, and nothing left in the heap to fragment it (with the CPU
// backend's malloc setting, per-call blocks carved up the space XLA's freed scratch
// buffer leaves, and the heap grew by a whole scratch buffer at a time: BUILD_NOTES.md).
struct ScratchBuffer {
  void* data = nullptr;
  size_t capacity = 0;
  void* reserve(size_t bytes) {
    if (bytes > capacity) {
      if (data) munmap(data, capacity);
      data = nullptr;
      capacity = 0;
      size_t size = (bytes + 4095) / 4096 * 4096;
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("out of memory for a oneDNN scratch buffer");
      data = p;
      capacity = size;
    }
    return data;
  }
};

struct Scratch {  // a oneDNN u8 view of `bytes` of a ScratchBuffer
  void* data = nullptr;
  dnnl_memory_desc_t md = nullptr;
  dnnl_memory_t m = nullptr;
  Scratch(ScratchBuffer& buffer, size_t bytes) {
    data = bytes ? buffer.reserve(bytes) : nullptr;
    md = strided({static_cast<int64_t>(bytes)}, {1}, kU8);
    CHECK(dnnl_memory_create(&m, md, engine(), data));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    dnnl_memory_destroy(m);
    dnnl_memory_desc_destroy(md);
  }
};

// One oneDNN primitive at a time: each already uses every core through OpenMP, and XLA
// may start two independent ones at once (an input and a weight gradient), which would
// run four threads on two cores. The shared scratch buffers rely on it too.
std::mutex& run_mutex() {
  static std::mutex m;
  return m;
}

void execute(dnnl_primitive_t p, std::vector<dnnl_exec_arg_t> args) {
  CHECK(dnnl_primitive_execute(p, stream(), static_cast<int>(args.size()), args.data()));
}

// kind 0: out = conv(a = x, b = w); 1: out = dx from (a = dy, b = w); 2: out = dw from (a = x, b = dy).
// groups: JAX's feature_group_count (the kernel is [kh, kw, c / groups, o]); c for depthwise.
ffi::Error Convolution(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                       int64_t kind, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                       int64_t groups) {
  try {
    auto da = a.dimensions(), db = b.dimensions(), dout = out->dimensions();
    if (da.size() != 4 || db.size() != 4 || dout.size() != 4 || kind < 0 || kind > 2)
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cxrjax_onednn_conv: expected rank-4 operands, kind 0-2");
    const auto x = kind == 1 ? dout : da;                 // NHWC input
    const auto w = kind == 2 ? dout : db;                 // HWIO kernel
    const auto y = kind == 0 ? dout : kind == 1 ? da : db;  // NHWC output
    // The operands must agree, or oneDNN would read or write outside them.
    if (groups < 1 || x[3] != w[2] * groups || w[3] % groups != 0 || y[0] != x[0] || y[3] != w[3] || sh < 1 ||
        sw < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0)
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cxrjax_onednn_conv: inconsistent shapes or parameters");
    Geometry g{kind, x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl, pr, groups};
    std::lock_guard<std::mutex> run_lock(run_mutex());
    static std::map<Geometry, std::unique_ptr<Plan>> plans;
    auto& slot = plans[g];
    if (!slot) slot = make_plan(g);
    const Plan& p = *slot;
    static ScratchBuffer conv_buffer, reorder_buffer, kernel_buffer;
    Scratch conv_scratch(conv_buffer, p.conv_scratch), reorder_scratch(reorder_buffer, p.reorder_scratch),
        kernel(kernel_buffer, p.reorder ? p.kernel_w_bytes : 0);
    void* user_w_data = kind == 2 ? out->untyped_data() : b.untyped_data();
    Memory user_w(p.user_w, user_w_data), kernel_w(p.kernel_w, p.reorder ? kernel.data : user_w_data);
    if (kind != 2 && p.reorder)
      execute(p.reorder, {{kArgFrom, user_w.m}, {kArgTo, kernel_w.m}, {kArgScratchpad, reorder_scratch.m}});
    if (kind == 0) {
      Memory src(p.x, a.untyped_data()), dst(p.y, out->untyped_data());
      execute(p.conv, {{kArgSrc, src.m}, {kArgWeights, kernel_w.m}, {kArgDst, dst.m}, {kArgScratchpad, conv_scratch.m}});
    } else if (kind == 1) {
      Memory diff_dst(p.y, a.untyped_data()), diff_src(p.x, out->untyped_data());
      execute(p.conv, {{kArgDiffDst, diff_dst.m}, {kArgWeights, kernel_w.m}, {kArgDiffSrc, diff_src.m},
                       {kArgScratchpad, conv_scratch.m}});
    } else {
      Memory src(p.x, a.untyped_data()), diff_dst(p.y, b.untyped_data());
      execute(p.conv, {{kArgSrc, src.m}, {kArgDiffDst, diff_dst.m}, {kArgDiffWeights, kernel_w.m},
                       {kArgScratchpad, conv_scratch.m}});
      if (p.reorder)
        execute(p.reorder, {{kArgFrom, kernel_w.m}, {kArgTo, user_w.m}, {kArgScratchpad, reorder_scratch.m}});
    }
    CHECK(dnnl_stream_wait(stream()));
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("cxrjax_onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}


// Batch normalization over N, H and W of an NHWC tensor, with batch statistics (training).
// kind 0: forward (y, mean, biased variance from x, scale, shift; `relu` fuses a ReLU into
// y); kind 1: backward (dx, dscale, dshift from x, dy, mean, variance, scale), the full
// derivative through the batch statistics. A fused ReLU's mask is applied to dy by the
// caller (from y), so no workspace has to travel between the two calls.
struct NormGeometry {
  int64_t kind, n, h, w, c, relu;
  uint32_t eps_bits;
  auto key() const { return std::tie(kind, n, h, w, c, relu, eps_bits); }
  bool operator<(const NormGeometry& other) const { return key() < other.key(); }
};

struct NormPlan {
  dnnl_primitive_t prim = nullptr;
  dnnl_memory_desc_t x = nullptr, stat = nullptr, workspace = nullptr;
  size_t scratch = 0, workspace_bytes = 0;
};

std::unique_ptr<NormPlan> make_norm_plan(const NormGeometry& g, float eps) {
  auto plan = std::make_unique<NormPlan>();
  plan->x = nhwc(g.n, g.h, g.w, g.c);
  plan->stat = strided({g.c}, {1});
  dnnl_primitive_attr_t attr;
  CHECK(dnnl_primitive_attr_create(&attr));
  CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser));
  unsigned flags = kUseScale | kUseShift;
  dnnl_primitive_desc_t fwd, pd;
  CHECK(dnnl_batch_normalization_forward_primitive_desc_create(
      &fwd, engine(), kForwardTraining, plan->x, plan->x, eps, flags | (g.kind == 0 && g.relu ? kFuseNormRelu : 0u),
      attr));
  pd = fwd;
  if (g.kind == 1) {
    CHECK(dnnl_batch_normalization_backward_primitive_desc_create(&pd, engine(), kBackward, plan->x, plan->x,
                                                                  plan->x, eps, flags, fwd, attr));
  } else if (g.relu) {  // training with a fused ReLU writes its mask to a workspace, unused here
    CHECK(dnnl_memory_desc_clone(&plan->workspace, dnnl_primitive_desc_query_md(pd, kQueryWorkspaceMd, 0)));
    plan->workspace_bytes = dnnl_memory_desc_get_size(plan->workspace);
  }
  plan->scratch = scratch_bytes(pd);
  CHECK(dnnl_primitive_create(&plan->prim, pd));
  if (pd != fwd) dnnl_primitive_desc_destroy(pd);
  dnnl_primitive_desc_destroy(fwd);
  dnnl_primitive_attr_destroy(attr);
  return plan;
}

const NormPlan& norm_plan(int64_t kind, ffi::Span<const int64_t> x, int64_t relu, float eps) {
  uint32_t bits;
  static_assert(sizeof(bits) == sizeof(eps));
  std::memcpy(&bits, &eps, sizeof(bits));
  NormGeometry g{kind, x[0], x[1], x[2], x[3], relu, bits};
  static std::map<NormGeometry, std::unique_ptr<NormPlan>> plans;
  auto& slot = plans[g];
  if (!slot) slot = make_norm_plan(g, eps);
  return *slot;
}

bool same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

bool channels(ffi::Span<const int64_t> v, int64_t c) { return v.size() == 1 && v[0] == c; }

ffi::Error BatchNormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> var, float eps, int64_t relu) {
  try {
    auto dx = x.dimensions();
    if (dx.size() != 4 || !same(y->dimensions(), dx) || !channels(scale.dimensions(), dx[3]) ||
        !channels(shift.dimensions(), dx[3]) || !channels(mean->dimensions(), dx[3]) ||
        !channels(var->dimensions(), dx[3]) || !(eps > 0))
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cxrjax_onednn_bn_forward: inconsistent shapes or eps");
    std::lock_guard<std::mutex> run_lock(run_mutex());
    const NormPlan& p = norm_plan(0, dx, relu != 0, eps);
    static ScratchBuffer scratch_buffer, workspace_buffer;
    Scratch scratch(scratch_buffer, p.scratch);
    Memory src(p.x, x.untyped_data()), dst(p.x, y->untyped_data()), m(p.stat, mean->untyped_data()),
        v(p.stat, var->untyped_data()), s(p.stat, scale.untyped_data()), b(p.stat, shift.untyped_data());
    std::vector<dnnl_exec_arg_t> args = {{kArgSrc, src.m},      {kArgDst, dst.m},   {kArgMean, m.m},
                                         {kArgVariance, v.m},   {kArgScale, s.m},   {kArgShift, b.m},
                                         {kArgScratchpad, scratch.m}};
    std::unique_ptr<Memory> ws;
    if (p.workspace) {
      ws = std::make_unique<Memory>(p.workspace, workspace_buffer.reserve(p.workspace_bytes));
      args.push_back({kArgWorkspace, ws->m});
    }
    execute(p.prim, args);
    CHECK(dnnl_stream_wait(stream()));
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("cxrjax_onednn_bn_forward: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error BatchNormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dshift, float eps) {
  try {
    auto d = x.dimensions();
    if (d.size() != 4 || !same(dy.dimensions(), d) || !same(dx->dimensions(), d) ||
        !channels(mean.dimensions(), d[3]) || !channels(var.dimensions(), d[3]) ||
        !channels(scale.dimensions(), d[3]) || !channels(dscale->dimensions(), d[3]) ||
        !channels(dshift->dimensions(), d[3]) || !(eps > 0))
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cxrjax_onednn_bn_backward: inconsistent shapes or eps");
    std::lock_guard<std::mutex> run_lock(run_mutex());
    const NormPlan& p = norm_plan(1, d, 0, eps);
    static ScratchBuffer scratch_buffer;
    Scratch scratch(scratch_buffer, p.scratch);
    Memory src(p.x, x.untyped_data()), diff_dst(p.x, dy.untyped_data()), diff_src(p.x, dx->untyped_data()),
        m(p.stat, mean.untyped_data()), v(p.stat, var.untyped_data()), s(p.stat, scale.untyped_data()),
        ds(p.stat, dscale->untyped_data()), db(p.stat, dshift->untyped_data());
    execute(p.prim, {{kArgSrc, src.m}, {kArgDiffDst, diff_dst.m}, {kArgMean, m.m}, {kArgVariance, v.m},
                     {kArgScale, s.m}, {kArgDiffSrc, diff_src.m}, {kArgDiffScale, ds.m}, {kArgDiffShift, db.m},
                     {kArgScratchpad, scratch.m}});
    CHECK(dnnl_stream_wait(stream()));
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("cxrjax_onednn_bn_backward: ") + e.what());
  }
  return ffi::Error::Success();
}

// Adam's moment updates and its update direction in one pass over a parameter's
// gradient and moments (optax.scale_by_adam's arithmetic, operation for operation):
//   m <- a1 g + b1 m;  v <- a2 g^2 + b2 v;  u = (m / d1) / (sqrt(v / d2 + eps_root) + eps)
// with a1 = 1 - b1, a2 = 1 - b2 (rounded to float32 from double, as optax's), d1 = 1 - b1^t
// and d2 = 1 - b2^t computed by the caller. m and v are updated in
// place (aliased to outputs). Not oneDNN: XLA's CPU fusions ran this as four passes per
// parameter with materialised scalar broadcasts.
ffi::Error AdamUpdate(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v,
                      ffi::Buffer<ffi::F32> d1, ffi::Buffer<ffi::F32> d2, ffi::ResultBuffer<ffi::F32> u,
                      ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out, float a1, float b1,
                      float a2, float b2, float eps, float eps_root) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  if (static_cast<int64_t>(m.element_count()) != n || static_cast<int64_t>(v.element_count()) != n ||
      static_cast<int64_t>(u->element_count()) != n || static_cast<int64_t>(m_out->element_count()) != n ||
      static_cast<int64_t>(v_out->element_count()) != n || d1.element_count() != 1 || d2.element_count() != 1)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cxrjax_adam_update: inconsistent shapes");
  const float* gp = g.typed_data();
  const float* mp = m.typed_data();
  const float* vp = v.typed_data();
  float* up = u->typed_data();
  float* mo = m_out->typed_data();
  float* vo = v_out->typed_data();
  const float c1 = d1.typed_data()[0], c2 = d2.typed_data()[0];
  std::lock_guard<std::mutex> run_lock(run_mutex());  // the OpenMP threads are oneDNN's too
#pragma omp parallel for simd schedule(static) if (parallel : n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = gp[i];
    const float mi = a1 * gi + b1 * mp[i];
    const float vi = a2 * (gi * gi) + b2 * vp[i];
    mo[i] = mi;
    vo[i] = vi;
    up[i] = (mi / c1) / (std::sqrt(vi / c2 + eps_root) + eps);
  }
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = xla::ffi::Buffer<xla::ffi::F32>;  // every operand and result below

XLA_FFI_DEFINE_HANDLER_SYMBOL(cxrjax_onednn_conv, Convolution,
                              xla::ffi::Ffi::Bind()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<int64_t>("groups"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cxrjax_onednn_bn_forward, BatchNormForward,
                              xla::ffi::Ffi::Bind()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cxrjax_adam_update, AdamUpdate,
                              xla::ffi::Ffi::Bind()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("a1")
                                  .Attr<float>("b1")
                                  .Attr<float>("a2")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cxrjax_onednn_bn_backward, BatchNormBackward,
                              xla::ffi::Ffi::Bind()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("eps"));

extern "C" int cxrjax_onednn_version() {  // major * 10000 + minor * 100 + patch
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
