#pragma once
/// \file
/// \private The feature maps' vector-Jacobian products (SPEC 2) for the backward pass: given
/// scaled rows x [L, d] of one head and the gradient with respect to their features
/// df [L, F], the gradient with respect to x, plus what the features send to their
/// stabiliser (the exp maps' largest logit, expplus's key maximum). Conventions, as the
/// reference's TensorFlow graph differentiates it: the projection P and expplus's
/// coefficients A, B, D are constants; the stabilisers are differentiated, the gradient of a
/// maximum going to its argmax (split evenly between ties, as tf.reduce_max's); relu'(0) = 0.

#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../feature_maps.hpp"
#include "../tensor.hpp"
#include "bidirectional.hpp"

namespace kattn {
namespace detail {

/// The derivative of a built-in elementwise map's f(z), elementwise. Maps without one
/// (`known` false: a user's map) have no backward.
template <typename Map>
struct ElementwiseDerivative {
  static constexpr bool known = false;
  template <typename Scalar>
  static Scalar of(Scalar) { return Scalar(0); }
};

template <>
struct ElementwiseDerivative<Elu> {
  static constexpr bool known = true;
  template <typename Scalar>
  static Scalar of(Scalar z) { return z > Scalar(0) ? Scalar(1) : std::exp(z); }
};

template <>
struct ElementwiseDerivative<Relu> {
  static constexpr bool known = true;
  // relu'(0) = 0, TensorFlow's convention.
  template <typename Scalar>
  static Scalar of(Scalar z) { return z > Scalar(0) ? Scalar(1) : Scalar(0); }
};

template <>
struct ElementwiseDerivative<Square> {
  static constexpr bool known = true;
  template <typename Scalar>
  static Scalar of(Scalar z) { return Scalar(2) * z; }
};

template <>
struct ElementwiseDerivative<Identity> {
  static constexpr bool known = true;
  template <typename Scalar>
  static Scalar of(Scalar) { return Scalar(1); }
};

/// Whether backward knows the derivative of Map (the seven built-in maps).
template <typename Map>
inline constexpr bool has_feature_backward_v =
    ElementwiseDerivative<Map>::known || std::is_same_v<Map, Exp> ||
    std::is_same_v<Map, ExpMod> || std::is_same_v<Map, ExpPlus>;

/// Everything the features of one side of one (batch row, head) depend on besides its rows.
template <typename Scalar>
struct FeatureSide {
  const Matrix<Scalar>* projection = nullptr;  ///< P [m, d], or null
  bool is_query = true;
  Scalar shift = 0;                             ///< exp maps: the side's largest logit M_b
  ExpPlus::Coefficients<Scalar> coeff{Scalar(0), Scalar(1), Scalar(1)};  ///< expplus
  Scalar key_max = 0;                           ///< expplus keys: the whole key tensor's max u
};

/// Features f [L, F] of scaled rows x [L, d], exactly as the forward computes them.
template <typename Map, typename Scalar>
void recomputeFeatures(const FeatureSide<Scalar>& side, const ConstBlock<Scalar>& x,
                       Matrix<Scalar>& f) {
  using Traits = feature_map_traits<Map>;
  const FeatureInput<Scalar> in{x, side.projection, side.is_query};
  f.resize(x.rows(), featureDim(x.cols(), side.projection));
  Block<Scalar> out(f);
  if constexpr (Traits::max_shifted) {
    Map{}.logits(in, out);
    Map{}.finish(in, out, side.shift);
  } else if constexpr (Traits::pair_statistics) {
    if (side.projection) {
      Map{}.logits(in, out);
      Map{}.finish(in, out, side.coeff, side.key_max);
    } else {
      Map{}(in, out);
    }
  } else {
    Map{}(in, out);
  }
}

/// The logits whose maximum stabilises a side: z = x P^T (x without P) for the exp maps,
/// u = d^(-1/4) x P^T for expplus.
template <typename Map, typename Scalar>
void stabiliserLogits(const ConstBlock<Scalar>& x, const Matrix<Scalar>* P, Matrix<Scalar>& z) {
  z.resize(x.rows(), featureDim(x.cols(), P));
  Map{}.logits(FeatureInput<Scalar>{x, P, false}, Block<Scalar>(z));
}

/// The largest entry of a set of logits and every place it is taken (row, head, feature).
template <typename Scalar>
struct ArgMax {
  Scalar value = -std::numeric_limits<Scalar>::infinity();
  std::vector<std::array<Index, 4>> at;  ///< (batch row, row, head, feature)

  /// Takes in the logits z of rows [r0, ...) of head n of batch row b.
  void scan(const Matrix<Scalar>& z, Index b, Index r0, Index n) {
    // Most blocks hold nothing as large as the largest so far: one vectorised maximum decides.
    // (A NaN maximum falls through to the loop, which passes NaN over as before.)
    if (z.size() == 0 || z.maxCoeff() < value) return;
    for (Index i = 0; i < z.rows(); ++i)
      for (Index j = 0; j < z.cols(); ++j) {
        const Scalar v = z(i, j);
        if (v > value) {
          value = v;
          at.assign(1, {b, r0 + i, n, j});
        } else if (v == value) {
          at.push_back({b, r0 + i, n, j});
        }
      }
  }
};

/// Adds to dx (a row [d]) the gradient `g` of one logit z_j = c x.P_j (x_j without P).
template <typename Scalar, typename Row>
void addLogitGradient(Row dx, const Matrix<Scalar>* P, Index j, Scalar g) {
  if (P) {
    dx += g * P->row(j);
  } else {
    dx(j) += g;
  }
}

/**
 * The vector-Jacobian product of the features of one block: dx [L, d] from df [L, F], for
 * rows x [L, d] whose features are f [L, F]. Adds to `dshift` what the block sends to its
 * side's stabiliser (exp maps: d/dM; expplus keys: d/d key_max); expplus's per-row query
 * stabiliser is taken here.
 */
template <typename Map, typename Scalar>
void featureBackward(const FeatureSide<Scalar>& side, const ConstBlock<Scalar>& x,
                     const Matrix<Scalar>& f, const Matrix<Scalar>& df, Matrix<Scalar>& dx,
                     Scalar& dshift) {
  static_assert(has_feature_backward_v<Map>,
                "kattn's backward knows the derivatives of the seven built-in feature maps only.");
  using Traits = feature_map_traits<Map>;
  const Matrix<Scalar>* P = side.projection;
  const Index L = x.rows(), d = x.cols();
  if constexpr (Traits::max_shifted) {
    // phi = exp(z + log h(x) - M) / sqrt(m): d/dz = phi, d/dM = -phi, and for exp
    // d log h / dx = -x.
    const Matrix<Scalar> e = (df.array() * f.array()).matrix();
    if (P) {
      dx.noalias() = e * *P;
    } else {
      dx = e;
    }
    dshift -= e.sum();
    if constexpr (std::is_same_v<Map, Exp>) {
      for (Index r = 0; r < L; ++r) dx.row(r) -= e.row(r).sum() * x.row(r);
    }
  } else if constexpr (Traits::pair_statistics) {
    if (!P) {
      dx = df;
      return;
    }
    // phi = Dc/sqrt(m) (E + 1e-6), E = exp(B u - st - g + w); dl is the gradient of E's
    // exponent, whose parts are B u, -st (B max u) and -g (c^2 |x|^2 / 2).
    const auto& k = side.coeff;
    const Scalar outer = k.D / std::sqrt(Scalar(P->rows()));
    const Scalar c2 = Scalar(1) / std::sqrt(Scalar(d)), c = std::sqrt(c2);
    const Matrix<Scalar> dl = (df.array() * (f.array() - outer * Scalar(1e-6))).matrix();
    Matrix<Scalar> du = k.B * dl;
    Matrix<Scalar> u;
    if (side.is_query) stabiliserLogits<Map, Scalar>(x, P, u);
    for (Index r = 0; r < L; ++r) {
      const Scalar rest = -dl.row(r).sum();  // d/dst and d/dg of this row
      if (side.is_query) {
        const Scalar top = u.row(r).maxCoeff();
        const Index ties = (u.row(r).array() == top).count();
        for (Index j = 0; j < u.cols(); ++j)
          if (u(r, j) == top) du(r, j) += k.B * rest / Scalar(ties);
      } else {
        dshift += k.B * rest;
      }
    }
    dx.noalias() = c * (du * *P);
    for (Index r = 0; r < L; ++r) dx.row(r) -= dl.row(r).sum() * c2 * x.row(r);
  } else {
    using Derivative = ElementwiseDerivative<Map>;
    Matrix<Scalar> z(L, featureDim(d, P));
    if (P) {
      z.noalias() = x * P->transpose();
    } else {
      z = x;
    }
    const Scalar norm = featureNormaliser(P);
    for (Index r = 0; r < L; ++r)
      for (Index j = 0; j < z.cols(); ++j) z(r, j) = Derivative::of(z(r, j)) * df(r, j) * norm;
    if (P) {
      dx.noalias() = z * *P;
    } else {
      dx = z;
    }
  }
}

}  // namespace detail
}  // namespace kattn
