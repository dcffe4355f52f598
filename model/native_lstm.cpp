// The stacked LSTM's inference forward in one call: the time loop, the gates and the matrix
// products of model/lstm.py's StackedLSTM, written again for the CPU without per-op dispatch.
//
// Built at run time by model/native.py (g++ -O3 -march=native, loaded with ctypes); the eager
// StackedLSTM stays the reference and the training path, and tests/test_native.py holds this to
// it. Plain C++ with GCC vector extensions: no torch headers, so a build takes about a second.
//
// Layout (prepared by model/native.py): every gate block is padded to Hp floats (H rounded up to
// the vector width), so a row of pre-activations is G * Hp floats, G = 4 (i, f, g, o) or 3 for the
// coupled variant (f, g, o). Weights are transposed, (K, G * Hp), and zero in the padding, so the
// padded hidden units stay exactly 0 and never reach a real one.

#include <cstdint>
#include <cstring>

namespace {

constexpr int kWidth = 8;
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

// MR rows of C = Ci + A @ Wt, all N columns (N a multiple of the vector width).
template <int MR>
void rows(int K, int N, const float* A, long lda, const float* Wt, const float* Ci, long ldci,
          float* C, long ldc) {
    int n = 0;
    for (; n + kNV * kWidth <= N; n += kNV * kWidth)
        block<MR, kNV>(K, A, lda, Wt + n, N, Ci + n, ldci, C + n, ldc);
    for (; n < N; n += kWidth) block<MR, 1>(K, A, lda, Wt + n, N, Ci + n, ldci, C + n, ldc);
}

// C (M, N) = Ci + A (M, K) @ Wt (K, N), row strides lda, ldci, ldc.
void gemm(int M, int K, int N, const float* A, long lda, const float* Wt, const float* Ci,
          long ldci, float* C, long ldc) {
    int m = 0;
    for (; m + 4 <= M; m += 4)
        rows<4>(K, N, A + m * lda, lda, Wt, Ci + m * ldci, ldci, C + m * ldc, ldc);
    for (; m < M; ++m) rows<1>(K, N, A + m * lda, lda, Wt, Ci + m * ldci, ldci, C + m * ldc, ldc);
}

enum Variant { kStandard = 0, kPeephole = 1, kCoupled = 2 };

// One timestep's gates for one row: pre-activations g (G * Hp) -> new c (in place) and h.
void cell_row(int variant, int Hp, const float* g, const float* peephole, float* c, float* h) {
    for (int j = 0; j < Hp; j += kWidth) {
        const vf c_prev = load(c + j);
        vf forget_gate, input_gate, candidate, o_pre;
        if (variant == kCoupled) {
            forget_gate = sigmoid_v(load(g + j));
            input_gate = 1.0f - forget_gate;
            candidate = tanh_v(load(g + Hp + j));
            o_pre = load(g + 2 * Hp + j);
        } else {
            vf i_pre = load(g + j), f_pre = load(g + Hp + j);
            if (variant == kPeephole) {
                i_pre += load(peephole + j) * c_prev;
                f_pre += load(peephole + Hp + j) * c_prev;
            }
            input_gate = sigmoid_v(i_pre);
            forget_gate = sigmoid_v(f_pre);
            candidate = tanh_v(load(g + 2 * Hp + j));
            o_pre = load(g + 3 * Hp + j);
        }
        const vf c_new = forget_gate * c_prev + input_gate * candidate;
        if (variant == kPeephole) o_pre += load(peephole + 2 * Hp + j) * c_new;
        store(c + j, c_new);
        store(h + j, sigmoid_v(o_pre) * tanh_v(c_new));
    }
}

constexpr int kRowBlock = 4;  // rows whose gates are computed, then used, while in L1

}  // namespace

extern "C" {

int lstm_vector_width() { return kWidth; }

// The stack's forward from (h0, c0) over x (B, T, in0). Each layer projects its whole input in
// one product (with the bias), then runs its time loop: the recurrent product and the cell, a
// block of rows at a time. Layer outputs (B, T, Hp) alternate between the two halves of `outs`;
// the last layer's is the stack's output. hn, cn: (layers, B, Hp); h0/c0 the same shape.
// Scratch: xproj (B * T, G * Hp), gates (kRowBlock, G * Hp).
int lstm_forward(int layers, int B, int T, int in0, int Hp, int variant, const float* x,
                 const float* const* w_ih, const float* const* w_hh, const float* const* bias,
                 const float* const* peephole, const float* h0, const float* c0, float* hn,
                 float* cn, float* xproj, float* outs, float* gates) {
    if (layers < 1 || B < 1 || T < 1 || in0 < 1 || Hp < 1 || Hp % kWidth) return 1;
    if (variant < kStandard || variant > kCoupled) return 2;
    const int N = (variant == kCoupled ? 3 : 4) * Hp;
    const long state = static_cast<long>(B) * Hp;
    const long out_half = static_cast<long>(B) * T * Hp;
    const float* in = x;
    int K = in0;
    for (int l = 0; l < layers; ++l) {
        float* out = outs + (l % 2) * out_half;
        float* c = cn + l * state;
        std::memcpy(c, c0 + l * state, state * sizeof(float));
        gemm(B * T, K, N, in, K, w_ih[l], bias[l], 0, xproj, N);  // (B*T, G*Hp)
        for (int t = 0; t < T; ++t) {
            for (int b = 0; b < B; b += kRowBlock) {
                const int m = B - b < kRowBlock ? B - b : kRowBlock;
                // h_{t-1} of row b: the layer's output at t - 1, or h0 at t = 0.
                const float* h_prev = t ? out + (static_cast<long>(b) * T + t - 1) * Hp
                                        : h0 + l * state + static_cast<long>(b) * Hp;
                const long ld_h = t ? static_cast<long>(T) * Hp : Hp;
                gemm(m, Hp, N, h_prev, ld_h, w_hh[l], xproj + (static_cast<long>(b) * T + t) * N,
                     static_cast<long>(T) * N, gates, N);
                for (int r = 0; r < m; ++r)
                    cell_row(variant, Hp, gates + r * N, peephole[l], c + (b + r) * Hp,
                             out + ((static_cast<long>(b) + r) * T + t) * Hp);
            }
        }
        for (int b = 0; b < B; ++b)
            std::memcpy(hn + l * state + static_cast<long>(b) * Hp,
                        out + (static_cast<long>(b) * T + T - 1) * Hp, Hp * sizeof(float));
        in = out;
        K = Hp;
    }
    return 0;
}

}  // extern "C"
