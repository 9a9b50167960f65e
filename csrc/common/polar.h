// Header-only per-matrix math shared by the CPU and CUDA paths: the r×r
// polar factor (scaled Newton, common/newton_polar.h, with one-sided Jacobi
// SVD as the exact fallback), the determinant fix and the soft rotation step.
// CPU tests therefore exercise the exact code the GPU runs.
//
// Matrices are dense row-major with a compile-time row stride R (the rank
// bucket) and a runtime active size n <= R.
#pragma once

#include "common/host_device.h"
#include "common/newton_polar.h"

namespace fedrot {

// Jacobi stops when every column pair has |cos angle| below n·eps, usually
// after 5-8 sweeps; the cap only bounds work on pathological (NaN) input.
constexpr int kMaxJacobiSweeps = 30;

template <typename T, int R>
FR_HD void set_identity(T* X, int n) {
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) X[a * R + b] = a == b ? T(1) : T(0);
}

// Column storage: Wc[j * R + k] is entry k of column j, so the column dot
// products and rotations below run over contiguous memory and vectorise.

// One-sided (Hestenes) Jacobi: rotates column pairs of W until they are
// mutually orthogonal, accumulating the same proper rotations in V, so that
// W_in · V = W_out. Column norms of W_out are the singular values.
template <typename T, int R>
FR_HD void jacobi_orthogonalize(T* Wc, T* Vc, int n) {
  set_identity<T, R>(Vc, n);
  const T tol = T(n) * Eps<T>::value;
  for (int sweep = 0; sweep < kMaxJacobiSweeps; ++sweep) {
    bool rotated = false;
    for (int p = 0; p + 1 < n; ++p) {
      T* wp = Wc + p * R;
      T* vp = Vc + p * R;
      for (int q = p + 1; q < n; ++q) {
        T* wq = Wc + q * R;
        T* vq = Vc + q * R;
        T alpha = 0, beta = 0, gamma = 0;
        for (int k = 0; k < n; ++k) {
          alpha += wp[k] * wp[k];
          beta += wq[k] * wq[k];
          gamma += wp[k] * wq[k];
        }
        // Negated comparison: also skips zero columns and NaN.
        if (!(fr_abs(gamma) > tol * fr_sqrt(alpha) * fr_sqrt(beta))) continue;
        rotated = true;
        const T zeta = (beta - alpha) / (T(2) * gamma);
        const T t = (zeta >= T(0) ? T(1) : T(-1)) / (fr_abs(zeta) + fr_sqrt(T(1) + zeta * zeta));
        const T c = T(1) / fr_sqrt(T(1) + t * t), s = c * t;
        for (int k = 0; k < n; ++k) {
          const T a = wp[k], b = wq[k];
          wp[k] = c * a - s * b;
          wq[k] = s * a + c * b;
        }
        for (int k = 0; k < n; ++k) {
          const T a = vp[k], b = vq[k];
          vp[k] = c * a - s * b;
          vq[k] = s * a + c * b;
        }
      }
    }
    if (!rotated) break;
  }
}

template <typename T, int R>
FR_HD void swap_columns(T* Xc, int n, int a, int b) {
  for (int k = 0; k < n; ++k) {
    const T tmp = Xc[a * R + k];
    Xc[a * R + k] = Xc[b * R + k];
    Xc[b * R + k] = tmp;
  }
}

// Turns the orthogonal columns of W (norms sigma, sorted descending) into an
// orthonormal U. Columns whose singular value is negligible are completed
// deterministically by Gram-Schmidt on the standard basis vector least
// covered by the columns already built, so rank-deficient M never gives NaN.
template <typename T, int R>
FR_HD void normalize_and_complete(T* Wc, const T* sigma, int n) {
  const T cutoff = sigma[0] * T(n) * Eps<T>::value;
  int rank = 0;
  while (rank < n && sigma[rank] > cutoff) ++rank;
  for (int j = 0; j < rank; ++j)
    for (int k = 0; k < n; ++k) Wc[j * R + k] /= sigma[j];
  for (int j = rank; j < n; ++j) {
    T* u = Wc + j * R;
    int best = 0;
    T best_residual = T(-1);
    for (int m = 0; m < n; ++m) {
      T covered = 0;
      for (int c = 0; c < j; ++c) covered += Wc[c * R + m] * Wc[c * R + m];
      if (T(1) - covered > best_residual) {
        best_residual = T(1) - covered;
        best = m;
      }
    }
    for (int k = 0; k < n; ++k) u[k] = k == best ? T(1) : T(0);
    for (int pass = 0; pass < 2; ++pass) {  // twice is enough (Kahan)
      for (int c = 0; c < j; ++c) {
        T dot = 0;
        for (int k = 0; k < n; ++k) dot += Wc[c * R + k] * u[k];
        for (int k = 0; k < n; ++k) u[k] -= dot * Wc[c * R + k];
      }
    }
    T norm = 0;
    for (int k = 0; k < n; ++k) norm += u[k] * u[k];
    norm = fr_sqrt(norm);
    for (int k = 0; k < n; ++k) u[k] /= norm;
  }
}

// Sign of det(X) by LU with partial pivoting on the scratch copy S. X is
// orthogonal here, so pivoting is perfectly stable and the sign is exact.
template <typename T, int R>
FR_HD int det_sign(const T* X, T* S, int n) {
  for (int a = 0; a < n * R; ++a) S[a] = X[a];
  int sign = 1;
  for (int col = 0; col < n; ++col) {
    int piv = col;
    for (int row = col + 1; row < n; ++row)
      if (fr_abs(S[row * R + col]) > fr_abs(S[piv * R + col])) piv = row;
    if (S[piv * R + col] == T(0)) return 1;  // singular: cannot happen for orthogonal X
    if (piv != col) {
      sign = -sign;
      for (int k = 0; k < n; ++k) {
        const T tmp = S[col * R + k];
        S[col * R + k] = S[piv * R + k];
        S[piv * R + k] = tmp;
      }
    }
    if (S[col * R + col] < T(0)) sign = -sign;
    for (int row = col + 1; row < n; ++row) {
      const T f = S[row * R + col] / S[col * R + col];
      for (int k = col + 1; k < n; ++k) S[row * R + k] -= f * S[col * R + k];
    }
  }
  return sign;
}

// One Björck step (common/newton_polar.h): Jacobi stops at |cos| ~ n·eps
// between columns; this brings X to orthogonality at working precision
// (quadratic convergence) without changing det X or the solution.
template <typename T, int R>
FR_HD void refine_orthogonality(T* X, T* E, int n) {
  bjorck_step<T, R, 0>(X, E, n);
}

// Scratch for one polar factor: three R×R matrices, R singular values and
// R pivot indices.
template <typename T, int R>
struct PolarScratch {
  T W[R * R];  // column storage (Jacobi)
  T V[R * R];  // column storage (Jacobi)
  T S[R * R];
  T sigma[R];
  int perm[R];
};

// The Jacobi-SVD path of polar_factor below: exact for any M, including
// rank-deficient ones and near ties of the two smallest singular values.
template <typename T, int R>
FR_HD void jacobi_polar_factor(const T* M, T* Out, int n, bool allow_reflection, PolarScratch<T, R>& s) {
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < n; ++k) s.W[j * R + k] = M[k * R + j];
  jacobi_orthogonalize<T, R>(s.W, s.V, n);
  for (int j = 0; j < n; ++j) {
    T norm = 0;
    for (int k = 0; k < n; ++k) norm += s.W[j * R + k] * s.W[j * R + k];
    s.sigma[j] = fr_sqrt(norm);
  }
  for (int j = 0; j + 1 < n; ++j) {  // selection sort, descending
    int best = j;
    for (int c = j + 1; c < n; ++c)
      if (s.sigma[c] > s.sigma[best]) best = c;
    if (best != j) {
      const T tmp = s.sigma[j];
      s.sigma[j] = s.sigma[best];
      s.sigma[best] = tmp;
      swap_columns<T, R>(s.W, n, j, best);
      swap_columns<T, R>(s.V, n, j, best);
    }
  }
  normalize_and_complete<T, R>(s.W, s.sigma, n);
  // Out = U Vᵀ = Σ_k u_k v_kᵀ: rank-1 updates over contiguous columns.
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) Out[a * R + b] = T(0);
  for (int k = 0; k < n; ++k)
    for (int a = 0; a < n; ++a) {
      const T u = s.W[k * R + a];
      for (int b = 0; b < n; ++b) Out[a * R + b] += u * s.V[k * R + b];
    }
  if (!allow_reflection && det_sign<T, R>(Out, s.S, n) < 0) {
    const T* u = s.W + (n - 1) * R;  // Out -= 2 u_last v_lastᵀ
    const T* v = s.V + (n - 1) * R;
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) Out[a * R + b] -= T(2) * u[a] * v[b];
  }
  refine_orthogonality<T, R>(Out, s.S, n);
}

// Out = U Vᵀ from M = U Σ Vᵀ: the orthogonal matrix maximising tr(Outᵀ M).
// Without reflections, the pair with the smallest singular value is flipped
// when det(U Vᵀ) < 0, giving the SO(r) maximiser. M (row-major) is not modified.
// Newton first; Jacobi where Newton cannot vouch for its result.
template <typename T, int R, int C>
FR_HD bool newton_polar_factor(const T* M, T* Out, int n, bool allow_reflection, PolarScratch<T, R>& s) {
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) Out[a * R + b] = M[a * R + b];
  int sign = 0;
  if (!newton_polar<T, R, C>(Out, s.W, s.perm, s.S, n, &sign)) return false;
  if (allow_reflection) return true;
  if (sign == 0) sign = det_sign<T, R>(Out, s.S, n);  // Schulz steps keep the sign of det M
  return sign > 0 || flip_smallest_pair<T, R, C>(M, Out, s.S, s.W, s.sigma, s.V, s.perm, n);
}

template <typename T, int R>
FR_HD void polar_factor(const T* M, T* Out, int n, bool allow_reflection, PolarScratch<T, R>& s) {
  const bool done = n == R ? newton_polar_factor<T, R, R>(M, Out, n, allow_reflection, s)
                           : newton_polar_factor<T, R, 0>(M, Out, n, allow_reflection, s);
  if (!done) jacobi_polar_factor<T, R>(M, Out, n, allow_reflection, s);
}

// Soft orthogonal Procrustes (docs/METHOD.md, steps 2-4): Rot = polar((1-λ) I + λ R*)
// with R* = polar(M). λ = 0, a zero M or a non-finite M give the identity
// (a non-finite M only comes from non-finite client factors, which the
// aggregation pass then reports). M is scaled to unit max-norm first so that
// fp32 never under- or overflows inside Jacobi. M is used as scratch.
template <typename T, int R>
FR_HD void soft_procrustes(T* M, T* Rot, int n, T lam, bool allow_reflection, PolarScratch<T, R>& s) {
  T scale = 0;
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) scale = fr_max(scale, fr_abs(M[a * R + b]));
  if (lam == T(0) || !(scale > T(0)) || !fr_isfinite(scale)) {
    set_identity<T, R>(Rot, n);
    return;
  }
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) M[a * R + b] /= scale;
  polar_factor<T, R>(M, Rot, n, allow_reflection, s);
  if (lam == T(1)) return;
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) M[a * R + b] = lam * Rot[a * R + b] + (a == b ? T(1) - lam : T(0));
  polar_factor<T, R>(M, Rot, n, allow_reflection, s);
}

}  // namespace fedrot
