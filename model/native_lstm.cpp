// The stacked LSTM's inference forward in one call: the time loop, the gates and the matrix
// products of model/lstm.py's StackedLSTM, written again for the CPU without per-op dispatch.
//
// Built at run time by model/native.py (g++ -O3 -march=native, loaded with ctypes); the eager
// StackedLSTM stays the reference and the training path, and tests/test_native.py holds this to
// it. Plain C++ with GCC vector extensions: no torch headers, so a build takes about a second.
//
// Layout (prepared by model/native.py): H is padded to Hp (a multiple of the vector width), and a
// row of pre-activations is G * Hp floats, G = 4 (i, f, g, o) or 3 for the coupled variant
// (f, g, o), grouped by hidden units: for each group of `width` units, its G gates side by side,
// so one group's recurrent product leaves all its gates in registers for the cell. W_ih is
// transposed, (K, G * Hp) in that column order; W_hh is blocked per group, (Hp / width, Hp,
// G * width). Weights are zero in the padding, so padded units stay exactly 0 and never reach a
// real one. Activations are time-major, (T, B, Hp).

#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace {

// LSTM_WIDTH and LSTM_ROWS override the choices below, for experiments; tests build the smaller
// geometries with -mno-avx512f and -mno-avx instead, as a CPU without those would.
#if defined(LSTM_WIDTH)
constexpr int kWidth = LSTM_WIDTH;
#elif defined(__AVX512F__)
constexpr int kWidth = 16;  // a zmm register
#else
constexpr int kWidth = 8;  // a ymm register (two xmm without AVX)
#endif
typedef float vf __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kWidth * sizeof(int32_t))));

inline vf splat(float a) { return vf{} + a; }
inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// e^x as 2^n e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial (relative error ~5e-9).
// The clamp keeps 2^n a normal float; a NaN fails both comparisons and stays NaN.
inline vf exp_v(vf x) {
    x = x < -87.0f ? splat(-87.0f) : x;
    x = x > 88.0f ? splat(88.0f) : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693145751953125f;  // ln 2 in two parts, so r keeps its precision
    r = r - n * 1.428606765330187e-06f;
    vf p = splat(1.0f / 5040);
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline vf sigmoid_v(vf x) { return 1.0f / (1.0f + exp_v(-x)); }
inline vf tanh_v(vf x) { return 2.0f / (1.0f + exp_v(-2.0f * x)) - 1.0f; }

// C[r, :] = Ci[r, :] + A[r, :K] @ Wt for MR rows and NV vectors of columns starting at the
// pointers given. Ci's row stride may be 0 (one bias row for every row).
template <int MR, int NV>
inline void block(int K, const float* A, long lda, const float* Wt, long ldw, const float* Ci,
                  long ldci, float* C, long ldc) {
    vf acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = load(Ci + r * ldci + v * kWidth);
    for (int k = 0; k < K; ++k) {
        vf w[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) w[v] = load(Wt + k * ldw + v * kWidth);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const vf a = splat(A[r * lda + k]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[r][v] += a * w[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kWidth, acc[r][v]);
}

constexpr int kNV = 4;  // vectors of columns per block
// Rows per block: rows x kNV accumulators, kNV weight vectors and a broadcast must fit the
// vector registers (32 with AVX-512, 16 without). 6 beat 4 by 10-20% on the AVX-512 machine
// this was measured on (batch 64 and 256).
#if defined(LSTM_ROWS)
constexpr int kRows = LSTM_ROWS;
#elif defined(__AVX512F__)
constexpr int kRows = 6;
#else
constexpr int kRows = 3;
#endif

// C (M, N) = Ci + A (M, K) @ Wt (K, N), row strides lda, ldci, ldc. Column blocks outside,
// rows inside: a block of Wt's columns stays in cache while every row passes through it.
void gemm(int M, int K, int N, const float* A, long lda, const float* Wt, const float* Ci,
          long ldci, float* C, long ldc) {
    constexpr int NB = kNV * kWidth;
    for (int n = 0; n < N; n += NB) {
        const bool full = n + NB <= N;
        int m = 0;
        for (; m + kRows <= M; m += kRows) {
            const float *a = A + m * lda, *ci = Ci + m * ldci + n;
            float* c = C + m * ldc + n;
            if (full)
                block<kRows, kNV>(K, a, lda, Wt + n, N, ci, ldci, c, ldc);
            else
                for (int v = 0; v < N - n; v += kWidth)
                    block<kRows, 1>(K, a, lda, Wt + n + v, N, ci + v, ldci, c + v, ldc);
        }
        for (; m < M; ++m) {
            const float *a = A + m * lda, *ci = Ci + m * ldci + n;
            float* c = C + m * ldc + n;
            if (full)
                block<1, kNV>(K, a, lda, Wt + n, N, ci, ldci, c, ldc);
            else
                for (int v = 0; v < N - n; v += kWidth)
                    block<1, 1>(K, a, lda, Wt + n + v, N, ci + v, ldci, c + v, ldc);
        }
    }
}

enum Variant { kStandard = 0, kPeephole = 1, kCoupled = 2 };

// One timestep of MR rows for one group of kWidth hidden units: the recurrent product of the
// group's gate columns (G vectors: i, f, g, o, or f, g, o when coupled) in registers, then the
// cell. h_prev: MR rows, stride ld_h; xp: the rows' projected inputs at this group, stride ld_x;
// c: the rows' cell state at this group, stride Hp, updated in place; h: the new h, stride ld_o.
template <int MR, int V>
inline void cell_block(int Hp, const float* h_prev, long ld_h, const float* Wt, long ldw,
                       const float* xp, long ld_x, const float* peephole, float* c, float* h,
                       long ld_o) {
    constexpr int G = V == kCoupled ? 3 : 4;
    vf acc[MR][G];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) acc[r][g] = load(xp + r * ld_x + g * kWidth);
    for (int k = 0; k < Hp; ++k) {
        vf w[G];
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) w[g] = load(Wt + k * ldw + g * kWidth);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const vf a = splat(h_prev[r * ld_h + k]);
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g) acc[r][g] += a * w[g];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        const vf c_prev = load(c + r * Hp);
        vf forget_gate, input_gate, candidate, o_pre;
        if constexpr (V == kCoupled) {
            forget_gate = sigmoid_v(acc[r][0]);
            input_gate = 1.0f - forget_gate;
            candidate = tanh_v(acc[r][1]);
            o_pre = acc[r][2];
        } else {
            vf i_pre = acc[r][0], f_pre = acc[r][1];
            if constexpr (V == kPeephole) {
                i_pre += load(peephole) * c_prev;
                f_pre += load(peephole + Hp) * c_prev;
            }
            input_gate = sigmoid_v(i_pre);
            forget_gate = sigmoid_v(f_pre);
            candidate = tanh_v(acc[r][2]);
            o_pre = acc[r][3];
        }
        const vf c_new = forget_gate * c_prev + input_gate * candidate;
        if constexpr (V == kPeephole) o_pre += load(peephole + 2 * Hp) * c_new;
        store(c + r * Hp, c_new);
        store(h + r * ld_o, sigmoid_v(o_pre) * tanh_v(c_new));
    }
}

// Timesteps [t0, t1) of one layer, from their projected inputs xproj ((t1 - t0), B, N). Time-major
// rows: the B rows a step reads (h at t - 1) and writes (h at t) are contiguous, never a stride
// of T rows (a power-of-two stride put every row of a batch in the same cache set).
template <int V>
void time_loop(int B, int t0, int t1, int Hp, const float* xproj, const float* w_hh,
               const float* peephole, const float* h0, float* c, float* out) {
    constexpr int G = V == kCoupled ? 3 : 4;
    const long N = static_cast<long>(G) * Hp, step = static_cast<long>(B) * Hp;
    for (int t = t0; t < t1; ++t) {
        // h_{t-1}: the layer's output at t - 1, or h0 at t = 0; both (B, Hp).
        const float* h_prev = t ? out + (t - 1) * step : h0;
        float* h_out = out + t * step;
        const float* xp_t = xproj + (t - t0) * B * N;
        for (int u = 0; u < Hp; u += kWidth) {  // a group of hidden units: its weights stay in L1
            const float* Wt = w_hh + static_cast<long>(u) * Hp * G;  // (Hp, G * kWidth)
            const float* xp = xp_t + static_cast<long>(u) * G;
            const float* p = peephole ? peephole + u : nullptr;
            int b = 0;
            for (; b + kRows <= B; b += kRows)
                cell_block<kRows, V>(Hp, h_prev + b * Hp, Hp, Wt, G * kWidth, xp + b * N, N, p,
                                     c + b * Hp + u, h_out + b * Hp + u, Hp);
            for (; b < B; ++b)
                cell_block<1, V>(Hp, h_prev + b * Hp, Hp, Wt, G * kWidth, xp + b * N, N, p,
                                 c + b * Hp + u, h_out + b * Hp + u, Hp);
        }
    }
}

}  // namespace

extern "C" {

int lstm_vector_width() { return kWidth; }

// Scratch up to this many floats (4 MiB) stays with the thread between calls; a larger chunk's
// is freed when its call returns, so one long request does not pin its memory for good.
constexpr size_t kKeepFloats = size_t{1} << 20;
// Inputs are projected a block of timesteps at a time, at most this many floats (1 MiB), so the
// projections a step reads are still in L2.
constexpr long kBlockFloats = long{1} << 18;

// The stack's forward from (h0, c0) over x, the outputs of the last layer into out, its final
// state into hn, cn. Time-major: x (T, B, in0), out (T, B, Hp); hn, cn, h0, c0 (layers, B, Hp).
// Each layer projects its input a block of timesteps at a time in one product (with the bias),
// then runs those timesteps. Columns are grouped by hidden units: column (u * G + g) + lane is
// gate g of unit u + lane (u a multiple of the width). w_hh is blocked by those groups:
// (Hp / width, Hp, G * width), each group's weights contiguous, so a step streams them in order.
// Layers below the last write to out or to scratch, alternately, so the last one writes out.
// Returns 0, or non-zero for arguments it refuses or memory it cannot have.
int lstm_forward(int layers, int B, int T, int in0, int Hp, int variant, const float* x,
                 const float* const* w_ih, const float* const* w_hh, const float* const* bias,
                 const float* const* peephole, const float* h0, const float* c0, float* out,
                 float* hn, float* cn) {
    if (layers < 1 || B < 1 || T < 1 || in0 < 1 || Hp < 1 || Hp % kWidth) return 1;
    if (variant < kStandard || variant > kCoupled) return 2;
    const int N = (variant == kCoupled ? 3 : 4) * Hp;
    const long state = static_cast<long>(B) * Hp;
    long block = kBlockFloats / (static_cast<long>(B) * N);  // timesteps per projection
    block = block < 1 ? 1 : (block > T ? T : block);
    const size_t need = static_cast<size_t>(block) * B * N +
                        (layers > 1 ? static_cast<size_t>(T) * B * Hp : 0);
    thread_local std::vector<float> kept;
    std::vector<float> once;
    float* scratch;
    try {
        std::vector<float>& buffer = need <= kKeepFloats ? kept : once;
        if (buffer.size() < need) buffer.resize(need);
        scratch = buffer.data();
    } catch (const std::bad_alloc&) {
        return 3;
    }
    float* xproj = scratch;                   // (block, B, N)
    float* mid = scratch + block * B * N;     // (T, B, Hp): a layer's output below the last
    const float* in = x;
    int K = in0;
    for (int l = 0; l < layers; ++l) {
        float* dst = (layers - 1 - l) % 2 ? mid : out;
        float* c = cn + l * state;
        std::memcpy(c, c0 + l * state, state * sizeof(float));
        const float* h = h0 + l * state;
        for (int t0 = 0; t0 < T; t0 += block) {
            const int t1 = t0 + block < T ? t0 + block : T;
            gemm((t1 - t0) * B, K, N, in + static_cast<long>(t0) * B * K, K, w_ih[l], bias[l], 0,
                 xproj, N);
            if (variant == kStandard)
                time_loop<kStandard>(B, t0, t1, Hp, xproj, w_hh[l], nullptr, h, c, dst);
            else if (variant == kPeephole)
                time_loop<kPeephole>(B, t0, t1, Hp, xproj, w_hh[l], peephole[l], h, c, dst);
            else
                time_loop<kCoupled>(B, t0, t1, Hp, xproj, w_hh[l], nullptr, h, c, dst);
        }
        std::memcpy(hn + l * state, dst + (T - 1) * state, state * sizeof(float));
        in = dst;
        K = Hp;
    }
    return 0;
}

}  // extern "C"
