// 3x3 stride-1 "same" convolutions for XLA:CPU, as XLA FFI custom calls: register-tiled
// direct convolutions over NHWC activations, vectorised over output channels.
//
//   forward:  y[b, h, w]  = sum_{kh, kw} x[b, h + kh - 1, w + kw - 1] @ k[kh, kw]   y: [B, H, W, Co]
//   weights:  dk[kh, kw] = sum_{b, h, w} x[b, h + kh - 1, w + kw - 1]^T dy[b, h, w] dk: [9, Ci, Co]
// with x read as zero outside the image (no padded copy is made). The input gradient is the
// forward kernel applied to dy with the kernel flipped and its channel axes swapped
// (vcl_jax/kernels/conv3x3.py), so it has no kernel of its own.
//
// Each kernel keeps an R x (V vectors) tile of its output in registers: the forward tile is R
// pixels of one image row by V*kLanes output channels, the weight tile R input channels by
// V*kLanes output channels of one tap, accumulated over a block of image rows. Output channels
// must be a multiple of kLanes (vcl_conv3x3_lanes() reports it; the Python side falls back to
// XLA's convolution otherwise). Work is shared with XLA's own intra-op thread pool (the FFI
// ThreadPool), so a kernel never runs more threads than XLA has.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kTileR = 6;  // 6 x 4 accumulators + 4 kernel vectors + 1 broadcast of 32 registers
constexpr int kTileV = 4;
typedef float Vec __attribute__((vector_size(64), aligned(4)));
inline Vec Splat(float a) { return _mm512_set1_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kTileR = 3;  // 3 x 4 + 4 + 1 of 16 registers
constexpr int kTileV = 4;
typedef float Vec __attribute__((vector_size(32), aligned(4)));
inline Vec Splat(float a) { return _mm256_set1_ps(a); }
#else
#error "conv3x3.cc needs AVX2 and FMA (or AVX-512)"
#endif

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// body(item) for every item in [0, n), shared between the calling thread and up to `workers`
// tasks on XLA's thread pool. Items are taken from an atomic counter, so which thread runs an
// item varies: a body must write only its item's own output. A task the pool starts late finds
// no work left and returns without touching the caller's data.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int workers, F&& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, &body] {
    int64_t finished = 0;
    for (int64_t i; (i = st->next.fetch_add(1)) < n; ++finished) body(i);
    if (finished && st->done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  };
  for (int t = 0; t < workers && t + 1 < n; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

int Workers(ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(0, pool.num_threads() - 1));
}

struct Geometry {
  int64_t b, h, w, ci, co;
  // Start of pixel (row r = b * H + h, column q) of an [B, H, W, C] activation, in floats.
  int64_t at(int64_t r, int64_t q, int64_t c) const { return (r * w + q) * c; }
  // Whether image row r = b * H + h has a neighbour at h + dh.
  bool has_row(int64_t r, int64_t dh) const { return r % h + dh >= 0 && r % h + dh < h; }
};

// y[pixels q0 .. q0+R of image row r, c0 .. c0 + V*kLanes]; `zeros` holds Ci zeros, read for
// the pixels left and right of the image.
template <int R, int V>
void ForwardTile(const Geometry& g, const float* x, const float* k, const float* zeros,
                 float* y, int64_t r, int64_t q0, int64_t c0) {
  Vec acc[R][V] = {};
  for (int s = 0; s < 9; ++s) {
    const int64_t dh = s / 3 - 1, dw = s % 3 - 1;
    if (!g.has_row(r, dh)) continue;
    const float* xs[R];
    for (int i = 0; i < R; ++i) {
      const int64_t q = q0 + i + dw;
      xs[i] = (q >= 0 && q < g.w) ? x + g.at(r + dh, q, g.ci) : zeros;
    }
    const float* ks = k + s * g.ci * g.co + c0;
    for (int64_t c = 0; c < g.ci; ++c) {
      Vec kv[V];
      for (int j = 0; j < V; ++j) kv[j] = Load(ks + c * g.co + j * kLanes);
      for (int i = 0; i < R; ++i) {
        const Vec a = Splat(xs[i][c]);
        for (int j = 0; j < V; ++j) acc[i][j] += a * kv[j];
      }
    }
  }
  float* out = y + g.at(r, q0, g.co) + c0;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) Store(out + i * g.co + j * kLanes, acc[i][j]);
}

template <int R>
void ForwardPixels(const Geometry& g, const float* x, const float* k, const float* zeros,
                   float* y, int64_t r, int64_t q0) {
  int64_t c0 = 0;
  for (; c0 + kTileV * kLanes <= g.co; c0 += kTileV * kLanes)
    ForwardTile<R, kTileV>(g, x, k, zeros, y, r, q0, c0);
  switch ((g.co - c0) / kLanes) {
    case 3: ForwardTile<R, 3>(g, x, k, zeros, y, r, q0, c0); break;
    case 2: ForwardTile<R, 2>(g, x, k, zeros, y, r, q0, c0); break;
    case 1: ForwardTile<R, 1>(g, x, k, zeros, y, r, q0, c0); break;
    default: break;
  }
}

// The last n < kTileR pixels of a row.
template <int R>
void ForwardRest(const Geometry& g, const float* x, const float* k, const float* zeros,
                 float* y, int64_t r, int64_t q0, int64_t n) {
  if constexpr (R > 0) {
    if (n == R) return ForwardPixels<R>(g, x, k, zeros, y, r, q0);
    return ForwardRest<R - 1>(g, x, k, zeros, y, r, q0, n);
  }
}

// dk[s, c0 .. c0+R, k0 .. k0 + V*kLanes] += sum over image rows [r0, r1) of x^T dy.
template <int R, int V>
void WeightTile(const Geometry& g, const float* x, const float* dy, float* dk, int s, int64_t c0,
                int64_t k0, int64_t r0, int64_t r1) {
  const int64_t dh = s / 3 - 1, dw = s % 3 - 1;
  // output pixels q whose input pixel q + dw lies in the image
  const int64_t q_lo = std::max<int64_t>(0, -dw), q_hi = std::min(g.w, g.w - dw);
  Vec acc[R][V] = {};
  for (int64_t r = r0; r < r1; ++r) {
    if (!g.has_row(r, dh)) continue;
    const float* xs = x + g.at(r + dh, dw, g.ci) + c0;
    const float* gs = dy + g.at(r, 0, g.co) + k0;
    for (int64_t q = q_lo; q < q_hi; ++q) {
      Vec gv[V];
      for (int j = 0; j < V; ++j) gv[j] = Load(gs + q * g.co + j * kLanes);
      for (int i = 0; i < R; ++i) {
        const Vec a = Splat(xs[q * g.ci + i]);
        for (int j = 0; j < V; ++j) acc[i][j] += a * gv[j];
      }
    }
  }
  float* out = dk + (s * g.ci + c0) * g.co + k0;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) {
      float* o = out + i * g.co + j * kLanes;
      Store(o, Load(o) + acc[i][j]);
    }
}

template <int R>
void WeightChannels(const Geometry& g, const float* x, const float* dy, float* dk, int s,
                    int64_t c0, int64_t r0, int64_t r1) {
  int64_t k0 = 0;
  for (; k0 + kTileV * kLanes <= g.co; k0 += kTileV * kLanes)
    WeightTile<R, kTileV>(g, x, dy, dk, s, c0, k0, r0, r1);
  switch ((g.co - k0) / kLanes) {
    case 3: WeightTile<R, 3>(g, x, dy, dk, s, c0, k0, r0, r1); break;
    case 2: WeightTile<R, 2>(g, x, dy, dk, s, c0, k0, r0, r1); break;
    case 1: WeightTile<R, 1>(g, x, dy, dk, s, c0, k0, r0, r1); break;
    default: break;
  }
}

template <int R>
void WeightRest(const Geometry& g, const float* x, const float* dy, float* dk, int s, int64_t c0,
                int64_t n, int64_t r0, int64_t r1) {
  if constexpr (R > 0) {
    if (n == R) return WeightChannels<R>(g, x, dy, dk, s, c0, r0, r1);
    return WeightRest<R - 1>(g, x, dy, dk, s, c0, n, r0, r1);
  }
}

// Checks x: [B, H, W, Ci] against an [B, H, W, Co] activation and Ci, Co.
ffi::Error Check(const char* what, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd,
                 int64_t ci, int64_t co, Geometry* g) {
  const std::string name(what);
  if (xd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || xd[1] != yd[1] || xd[2] != yd[2] ||
      xd[3] != ci || yd[3] != co)
    return ffi::Error::InvalidArgument(name + ": inconsistent shapes");
  if (co % kLanes != 0)
    return ffi::Error::InvalidArgument(name + ": output channels must be a multiple of " +
                                       std::to_string(kLanes));
  *g = Geometry{yd[0], yd[1], yd[2], ci, co};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto kd = k.dimensions();
  if (kd.size() != 3 || kd[0] != 9)
    return ffi::Error::InvalidArgument("conv3x3_forward: kernel must be [9, Ci, Co]");
  Geometry g;
  if (auto e = Check("conv3x3_forward", x.dimensions(), y->dimensions(), kd[1], kd[2], &g);
      e.failure())
    return e;
  const std::vector<float> zeros(g.ci, 0.0f);
  const float* xd = x.typed_data();
  const float* kp = k.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, g.b * g.h, Workers(pool), [&](int64_t r) {
    int64_t q0 = 0;
    for (; q0 + kTileR <= g.w; q0 += kTileR)
      ForwardPixels<kTileR>(g, xd, kp, zeros.data(), yd, r, q0);
    ForwardRest<kTileR - 1>(g, xd, kp, zeros.data(), yd, r, q0, g.w - q0);
  });
  return ffi::Error::Success();
}

constexpr int64_t kBlockPixels = 512;  // pixels of x and dy swept per pass of the weight gradient
constexpr int64_t kChunks = 16;  // partial sums of the weight gradient (threads share them out)

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk) {
  const auto kd = dk->dimensions();
  if (kd.size() != 3 || kd[0] != 9)
    return ffi::Error::InvalidArgument("conv3x3_weight_grad: kernel must be [9, Ci, Co]");
  Geometry g;
  if (auto e = Check("conv3x3_weight_grad", x.dimensions(), dy.dimensions(), kd[1], kd[2], &g);
      e.failure())
    return e;
  const int64_t taps = 9 * g.ci * g.co, rows = g.b * g.h;
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockPixels / g.w);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  // The blocks are summed in a fixed order whatever the threads do: `chunks` contiguous runs
  // of blocks, each accumulated by one task into its own partial sum, the partials then added
  // in chunk order. (Per-thread sums over blocks taken from a shared counter made the result
  // depend on scheduling: the same seed trained to different numbers run to run.) The number
  // of chunks does not depend on the thread count, so any machine sums in the same order.
  const int64_t chunks = std::min<int64_t>(blocks, kChunks);
  std::vector<float> partial(static_cast<size_t>(chunks) * taps, 0.0f);
  const float* xd = x.typed_data();
  const float* gd = dy.typed_data();
  ParallelFor(pool, chunks, Workers(pool), [&](int64_t chunk) {
    float* acc = partial.data() + chunk * taps;
    const int64_t b0 = blocks * chunk / chunks, b1 = blocks * (chunk + 1) / chunks;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      for (int s = 0; s < 9; ++s) {
        int64_t c0 = 0;
        for (; c0 + kTileR <= g.ci; c0 += kTileR)
          WeightChannels<kTileR>(g, xd, gd, acc, s, c0, r0, r1);
        WeightRest<kTileR - 1>(g, xd, gd, acc, s, c0, g.ci - c0, r0, r1);
      }
    }
  });
  float* out = dk->typed_data();
  std::memcpy(out, partial.data(), taps * sizeof(float));
  for (int64_t c = 1; c < chunks; ++c)
    for (int64_t i = 0; i < taps; ++i) out[i] += partial[c * taps + i];
  return ffi::Error::Success();
}

}  // namespace

extern "C" int vcl_conv3x3_lanes() { return kLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(VclConv3x3Forward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VclConv3x3WeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
