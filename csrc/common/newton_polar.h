// Fast path of the r×r polar factor (used by common/polar.h): the scaled
// Newton iteration X <- (ζX + (ζX)^{-T}) / 2 (Higham 1986) until X is near
// orthogonal, then Newton–Schulz steps X <- X + X (I − XᵀX) / 2 to working
// precision. A Newton step costs one Gauss-Jordan inverse (n³ FMAs along a
// serial chain of pivots); a Schulz step is two matrix products, about a fifth
// of the time at r = 16 on the CPU, and squares the distance to orthogonality.
// Each function returns false when it cannot vouch for its result
// (near-singular input, no convergence); polar.h then takes the Jacobi path.
//
// Matrices are dense row-major with a compile-time row stride R. Each
// function takes the active size as `n` and, where the caller knows it at
// compile time (n == R, the usual LoRA ranks), as C = n too: the fixed trip
// counts let the compiler keep a pivot row in registers. C = 0: runtime n.
#pragma once

#include "common/host_device.h"

namespace fedrot {

template <typename T> struct Eps;
template <> struct Eps<float> { static constexpr float value = 1.1920929e-07f; };
template <> struct Eps<double> { static constexpr double value = 2.220446049250313e-16; };

// With Frobenius scaling, 9 steps reach double precision from cond 1e16.
constexpr int kMaxNewtonSteps = 16;
// Schulz steps take over once ‖I − XᵀX‖_F is at most this (X scaled to unit RMS
// singular value): every singular value is then within (1/2, sqrt(7)/2), where each
// step maps the defect e to at most e²(3 + e)/4, which reaches sqrt(eps) in ≤ 7 steps.
constexpr double kSchulzStart = 0.75;
constexpr int kMaxSchulzSteps = 10;
// Only up to this rank bucket: at r = 32 and 64 two r³ products per step cost more than Newton's
// last inverses, so those buckets run Newton to convergence and finish with one Schulz step.
constexpr int kMaxSchulzRank = 16;

// In-place Gauss-Jordan inverse with partial (row) pivoting, leaving the
// columns permuted: afterwards A⁻¹[:, j] = A[:, col[j]] (`col` holds R ints).
// Callers that read A⁻¹ through `col` skip the n strided column swaps.
// Sets *det_sign to the sign of det A. False when a pivot falls below
// n·eps of the largest entry: the inverse would be mostly rounding error.
template <typename T, int R, int C>
FR_HD bool gauss_jordan_in_place(T* A, int* col, int n_runtime, int* det_sign) {
  const int n = C ? C : n_runtime;
  T lanes[R] = {};  // per-column partial results vectorise; one serial chain would not
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) lanes[b] = fr_max(lanes[b], fr_abs(A[a * R + b]));
  T amax = 0;
  for (int b = 0; b < n; ++b) amax = fr_max(amax, lanes[b]);
  const T tiny = amax * T(n) * Eps<T>::value;
  int sign = 1;
  int rows[R];  // rows[i]: the row of A now at position i
  for (int j = 0; j < n; ++j) rows[j] = j;
  for (int k = 0; k < n; ++k) {
    // The running maximum is kept by value: comparing against A[piv][k]
    // would make every step wait on a load addressed by the previous one.
    int piv = k;
    T best = fr_abs(A[k * R + k]);
    for (int i = k + 1; i < n; ++i) {
      const T v = fr_abs(A[i * R + k]);
      if (v > best) {
        best = v;
        piv = i;
      }
    }
    if (!(best > tiny)) return false;  // also catches NaN
    if (piv != k) {
      sign = -sign;
      for (int b = 0; b < n; ++b) {
        const T tmp = A[k * R + b];
        A[k * R + b] = A[piv * R + b];
        A[piv * R + b] = tmp;
      }
      const int tmp = rows[k];
      rows[k] = rows[piv];
      rows[piv] = tmp;
    }
    T* rk = A + k * R;
    if (rk[k] < T(0)) sign = -sign;
    const T inv = T(1) / rk[k];
    rk[k] = T(1);
    // Row i <- row i · keep − f · pivot row, with keep zero in column k: one
    // vector pass per row, where storing ri[k] = 0 first would stall the
    // wide loads behind it. pivot_row: a copy the compiler sees as unaliased.
    T pivot_row[R], keep[R];
    FR_SIMD for (int b = 0; b < n; ++b) {
      pivot_row[b] = rk[b] *= inv;
      keep[b] = b == k ? T(0) : T(1);
    }
    for (int i = 0; i < n; ++i) {
      if (i == k) continue;
      T* ri = A + i * R;
      const T f = ri[k];
      FR_SIMD for (int b = 0; b < n; ++b) ri[b] = ri[b] * keep[b] - f * pivot_row[b];
    }
  }
  // A now holds (P A)⁻¹ = A⁻¹ Pᵀ, P the row permutation: A⁻¹ = (P A)⁻¹ P.
  for (int i = 0; i < n; ++i) col[rows[i]] = i;
  *det_sign = sign;
  return true;
}

// gauss_jordan_in_place with the columns put back: A <- A⁻¹.
template <typename T, int R, int C>
FR_HD bool invert_in_place(T* A, int* perm, int n_runtime, int* det_sign) {
  const int n = C ? C : n_runtime;
  if (!gauss_jordan_in_place<T, R, C>(A, perm, n, det_sign)) return false;
  T row[R];
  for (int a = 0; a < n; ++a) {
    for (int j = 0; j < n; ++j) row[j] = A[a * R + perm[j]];
    for (int j = 0; j < n; ++j) A[a * R + j] = row[j];
  }
  return true;
}

// ‖X‖_F², not rooted: for X = I (or a signed permutation) the unit-RMS scale is then exactly 1.
template <typename T, int R, int C>
FR_HD T frobenius_sq(const T* X, int n_runtime) {
  const int n = C ? C : n_runtime;
  T lanes[R] = {};
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) lanes[b] += X[a * R + b] * X[a * R + b];
  T sum = 0;
  for (int b = 0; b < n; ++b) sum += lanes[b];
  return sum;
}

// Rows of an r×r product computed together on the CPU: kProductRows · R / 16 vector accumulators
// (16 at R = 64), so that each row of the right factor loaded serves all of them. The GPU runs one
// matrix per thread, with no vector registers to fill: one row at a time there.
#if defined(__CUDA_ARCH__)
constexpr int kProductRows = 1;
#else
constexpr int kProductRows = 4;
#endif

// emit(a, P_a) for each row a < n of P = left · Y: P_a[b] = Σ_k left(a, k) Y[k][b] (b < n), summed
// over k in increasing order. Rows past n in the last block repeat row a0 and are not emitted.
template <typename T, int R, int C, typename Left, typename Emit>
FR_HD void product_rows(const T* Y, int n_runtime, Left left, Emit emit) {
  const int n = C ? C : n_runtime;
  constexpr int RB = kProductRows < R ? kProductRows : R;
  for (int a0 = 0; a0 < n; a0 += RB) {
    T acc[RB][R];
#pragma GCC unroll 4
    for (int ab = 0; ab < RB; ++ab)
      FR_SIMD for (int b = 0; b < n; ++b) acc[ab][b] = T(0);
    for (int k = 0; k < n; ++k) {
      const T* y = Y + k * R;
#pragma GCC unroll 4
      for (int ab = 0; ab < RB; ++ab) {
        const T c = left(a0 + ab < n ? a0 + ab : a0, k);
        FR_SIMD for (int b = 0; b < n; ++b) acc[ab][b] += c * y[b];
      }
    }
    for (int ab = 0; ab < RB && a0 + ab < n; ++ab) emit(a0 + ab, acc[ab]);
  }
}

// E = I − s·XᵀX; returns ‖E‖_F.
template <typename T, int R, int C>
FR_HD T gram_defect(const T* X, T s, T* E, int n_runtime) {
  const int n = C ? C : n_runtime;
  T lanes[R] = {};
  product_rows<T, R, C>(X, n, [&](int a, int k) { return X[k * R + a]; }, [&](int a, const T* row) {
    FR_SIMD for (int b = 0; b < n; ++b) {
      const T e = (a == b ? T(1) : T(0)) - s * row[b];
      E[a * R + b] = e;
      lanes[b] += e * e;
    }
  });
  T sum = 0;
  for (int b = 0; b < n; ++b) sum += lanes[b];
  return fr_sqrt(sum);
}

// X <- X + X E / 2 (E = I − XᵀX): one Newton–Schulz (Björck) step. It keeps
// det X's sign and the polar factor, and moves every singular value towards 1.
// Row a of X is written once the product rows of its block are complete, which read only rows of E.
template <typename T, int R, int C>
FR_HD void schulz_update(T* X, const T* E, int n_runtime) {
  const int n = C ? C : n_runtime;
  product_rows<T, R, C>(E, n, [&](int a, int k) { return X[a * R + k]; }, [&](int a, const T* row) {
    FR_SIMD for (int b = 0; b < n; ++b) X[a * R + b] += T(0.5) * row[b];
  });
}

// One Schulz (Björck) step without the defect: E = I − XᵀX, then X <- X + X E / 2.
template <typename T, int R, int C>
FR_HD void bjorck_step(T* X, T* E, int n_runtime) {
  gram_defect<T, R, C>(X, T(1), E, n_runtime);
  schulz_update<T, R, C>(X, E, n_runtime);
}

// X near orthogonal, E = I − XᵀX and defect = ‖E‖_F ≤ kSchulzStart: Schulz
// steps until the defect is below sqrt(eps), so that the last one leaves it at
// rounding level. False if the defect stops falling (NaN, or a rounding floor
// above sqrt(eps), which does not happen at r ≤ 64).
template <typename T, int R, int C>
FR_HD bool schulz_finish(T* X, T* E, int n, T defect) {
  const T done = fr_sqrt(Eps<T>::value);
  for (int step = 0; step < kMaxSchulzSteps; ++step) {
    schulz_update<T, R, C>(X, E, n);
    if (defect < done) return true;
    const T next = gram_defect<T, R, C>(X, T(1), E, n);
    if (!(next < defect)) return false;
    defect = next;
  }
  return false;
}

// X (row-major, holding M) <- its orthogonal polar factor: Newton steps until
// X, scaled to unit RMS singular value, is within kSchulzStart of orthogonal,
// then Schulz steps (R > kMaxSchulzRank: Newton to convergence, one Schulz step). Y, perm and E are scratch. *det_sign = sign det M
// from the first inverse, or 0 when X was near orthogonal from the start (no
// inverse taken; the sign is then that of the result's determinant). False
// when M is too ill-conditioned for the working precision (Jacobi handles it)
// or no convergence.
template <typename T, int R, int C>
FR_HD bool newton_polar(T* X, T* Y, int* perm, T* E, int n_runtime, int* det_sign) {
  const int n = C ? C : n_runtime;
  // Newton's own stop (large buckets): the last step's change is below eps^(1/4)/2, so each
  // singular value is within sqrt(eps)/8 of 1 and one Schulz step finishes it.
  const T tol = T(0.5) * fr_sqrt(fr_sqrt(Eps<T>::value));
  *det_sign = 0;
  bool scaled = true;
  for (int step = 0; step < kMaxNewtonSteps; ++step) {
    const T nx2 = frobenius_sq<T, R, C>(X, n);
    const T unit_rms = T(n) / nx2;
    const T defect = R <= kMaxSchulzRank ? gram_defect<T, R, C>(X, unit_rms, E, n) : T(kSchulzStart) + T(1);
    if (defect <= T(kSchulzStart)) {
      const T root = fr_sqrt(unit_rms);
      for (int a = 0; a < n; ++a)
        for (int b = 0; b < n; ++b) X[a * R + b] *= root;
      return schulz_finish<T, R, C>(X, E, n, defect);
    }
    // Y <- X⁻¹ with columns permuted, so X⁻ᵀ[a][b] = X⁻¹[b][a] = Y[b][perm[a]]:
    // the update reads X⁻ᵀ through that map (no transpose, no column swaps).
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) Y[a * R + b] = X[a * R + b];
    int sign = 1;
    if (!gauss_jordan_in_place<T, R, C>(Y, perm, n, &sign)) return false;
    const T nx = fr_sqrt(nx2), ny = fr_sqrt(frobenius_sq<T, R, C>(Y, n));
    // cond_F(M) = ‖M‖‖M⁻¹‖ above 1/eps: the first inverse carries no accuracy.
    if (step == 0) {
      if (!(nx * ny * Eps<T>::value < T(1))) return false;
      *det_sign = sign;
    }
    const T zeta = scaled ? fr_sqrt(ny / nx) : T(1);
    const T half_zeta = T(0.5) * zeta, half_inv = T(0.5) / zeta;
    T lanes[R] = {};
    for (int a = 0; a < n; ++a) {
      const T* y = Y + perm[a];  // column perm[a] of Y: row a of X⁻ᵀ
      for (int b = 0; b < n; ++b) {
        const T next = half_zeta * X[a * R + b] + half_inv * y[b * R];
        const T d = next - X[a * R + b];
        lanes[b] += d * d;
        X[a * R + b] = next;
      }
    }
    T change = 0;
    for (int b = 0; b < n; ++b) change += lanes[b];
    change = fr_sqrt(change);
    if (R > kMaxSchulzRank && change < tol) {
      bjorck_step<T, R, C>(X, E, n);
      return true;
    }
    if (change < T(0.01)) scaled = false;  // scaling only slows the final quadratic steps
  }
  return false;
}

// For det M < 0 without reflections: Q <- Q (I − 2 v vᵀ), v the unit
// eigenvector of H = QᵀM for its smallest eigenvalue (the smallest singular
// pair, as in the SVD path), found by power iteration on H⁻¹ from its
// largest-diagonal column, which has a component ≥ 1/n along v. It stops when
// ‖W v − ν v‖ ≤ 4 n eps ν (W = H⁻¹, ν = vᵀWv ≈ 1/σ_min): the angle to the true v
// is then below 4 n eps times σ_{n−1} / (σ_{n−1} − σ_n), the relative gap that
// also bounds the SVD path's accuracy. Up to n + 16 further steps, while the
// residual still falls, take the angle down to rounding (each divides it by
// σ_{n−1}/σ_n, for n² FMAs). S, W hold R×R, x and y R entries.
// False when that takes too long (a near tie of the two smallest singular
// values, where the iteration crawls): Jacobi decides those.
template <typename T, int R, int C>
FR_HD bool flip_smallest_pair(const T* M, T* Q, T* S, T* W, T* x, T* y, int* perm, int n_runtime) {
  const int n = C ? C : n_runtime;
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) S[a * R + b] = T(0);
  for (int k = 0; k < n; ++k)
    for (int a = 0; a < n; ++a) {
      const T q = Q[k * R + a];
      for (int b = 0; b < n; ++b) S[a * R + b] += q * M[k * R + b];
    }
  for (int a = 0; a < n; ++a)  // W = H⁻¹, H symmetrised
    for (int b = 0; b < n; ++b) W[a * R + b] = T(0.5) * (S[a * R + b] + S[b * R + a]);
  int sign = 1;
  if (!invert_in_place<T, R, C>(W, perm, n, &sign)) return false;
  int start = 0;
  for (int a = 1; a < n; ++a)
    if (W[a * R + a] > W[start * R + start]) start = a;
  for (int a = 0; a < n; ++a) x[a] = W[a * R + start];
  const T tol = T(4) * T(n) * Eps<T>::value;
  bool settled = false;
  T last_residual = T(0);
  for (int step = 0, extra = 0; step < 8 * n + 32 && extra < n + 16; ++step) {
    T norm = 0;
    for (int a = 0; a < n; ++a) norm += x[a] * x[a];
    norm = fr_sqrt(norm);
    for (int a = 0; a < n; ++a) x[a] /= norm;
    for (int a = 0; a < n; ++a) y[a] = T(0);  // y = W x as a sum of rows (W is symmetric)
    for (int b = 0; b < n; ++b)
      for (int a = 0; a < n; ++a) y[a] += x[b] * W[b * R + a];
    T nu = 0, residual = 0;
    for (int a = 0; a < n; ++a) nu += x[a] * y[a];
    for (int a = 0; a < n; ++a) residual += (y[a] - nu * x[a]) * (y[a] - nu * x[a]);
    residual = fr_sqrt(residual);
    if (settled && !(residual < last_residual)) break;  // at the rounding floor
    settled = settled || residual <= tol * nu;
    extra += settled;
    last_residual = residual;
    for (int a = 0; a < n; ++a) x[a] = y[a];
  }
  if (!settled) return false;
  T norm = 0;  // x is the unnormalised W v when the step cap came first
  for (int a = 0; a < n; ++a) norm += x[a] * x[a];
  norm = fr_sqrt(norm);
  for (int a = 0; a < n; ++a) x[a] /= norm;
  // u = Q v; Q -= 2 u vᵀ.
  for (int a = 0; a < n; ++a) {
    T sum = 0;
    for (int b = 0; b < n; ++b) sum += Q[a * R + b] * x[b];
    y[a] = sum;
  }
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) Q[a * R + b] -= T(2) * y[a] * x[b];
  return true;
}

}  // namespace fedrot
