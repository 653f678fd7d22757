#pragma once
/// \file
/// Feature maps phi (SPEC section 2): stateless functors that map a block of scaled queries or
/// keys of one head, [L, d], to kernel features [L, F] (F = m with a projection P [m, d],
/// F = d without). They know nothing of masking or of causality.
///
/// The contract (docs/feature_maps.md has a worked custom example):
/// - `static constexpr const char* name`;
/// - `template <class Scalar> void operator()(const FeatureInput<Scalar>& in,
///    FeatureBlock<Scalar> out) const`, writing F columns per row of `in.x`;
/// - optional: a specialisation of `feature_map_traits` (defaults are conservative).
/// Maps whose output needs a stabilising shift over more than one block (exp, expmod) or
/// statistics of the other side (expplus) expose extra members used by the layer; a user map
/// needs neither.

#include <cmath>
#include <type_traits>

#include "tensor.hpp"

namespace kattn {

/// A read-only block of rows, possibly strided (one head inside a `[L, N*d]` matrix).
template <typename Scalar>
using ConstFeatureBlock = Eigen::Ref<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// A writable block of rows, possibly strided.
template <typename Scalar>
using FeatureBlock = Eigen::Ref<Matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// What a feature map is given: one head's scaled rows and the projection (or none).
template <typename Scalar>
struct FeatureInput {
  ConstFeatureBlock<Scalar> x;          ///< [L, d] scaled queries or keys of one head
  const Matrix<Scalar>* projection;     ///< [m, d], or nullptr for no projection
  bool is_query;                        ///< queries or keys (only expplus distinguishes)
};

/// Number of features a map produces for head size d and projection P (or none).
template <typename Scalar>
Index featureDim(Index d, const Matrix<Scalar>* projection) {
  return projection ? projection->rows() : d;
}

/**
 * \brief Metadata of a feature map, kept apart from the functor as Eigen does for its functors.
 *
 * Defaults fit a user-defined map: it may stream and it needs no cross-block statistics.
 */
template <typename FeatureMap>
struct feature_map_traits {
  /// Uses whole-sequence statistics (future positions included): cannot stream.
  static constexpr bool bidirectional_only = false;
  /// exp-type: features are h(x) exp(z - M) with M the maximum logit over a batch row; the map
  /// exposes `logits` and `finish` so that the layer can choose M over all heads and blocks.
  static constexpr bool max_shifted = false;
  /// expplus: needs statistics of both sides per (batch row, head) and a key stabiliser.
  static constexpr bool pair_statistics = false;
};

namespace detail {

/// Writes z = x P^T (or x when there is no projection) into out.
template <typename Scalar>
void randomFeatureLogits(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> out) {
  if (in.projection) {
    out.noalias() = in.x * in.projection->transpose();
  } else {
    out = in.x;
  }
}

/// 1/sqrt(m) with a projection, 1 without: the Monte-Carlo normaliser of random features.
template <typename Scalar>
Scalar featureNormaliser(const Matrix<Scalar>* projection) {
  return projection ? Scalar(1) / std::sqrt(Scalar(projection->rows())) : Scalar(1);
}

/// Shared body of the maps phi(x) = f(x P^T) / sqrt(m) with h = 1.
template <typename Derived>
struct ElementwiseFeatureMap {
  template <typename Scalar>
  void operator()(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> out) const {
    if (!in.projection) {
      out = Derived::template f<Scalar>(in.x.array()).matrix();  // one pass, no copy first
      return;
    }
    randomFeatureLogits(in, out);
    const Scalar norm = featureNormaliser(in.projection);
    out = (Derived::template f<Scalar>(out.array()) * norm).matrix();
  }
};

}  // namespace detail

/**
 * \brief elu(z) + 1 (Katharopoulos et al. 2020, "Transformers are RNNs").
 *
 * Output > 0 everywhere; no overflow (linear growth). Exact up to rounding.
 */
struct Elu : detail::ElementwiseFeatureMap<Elu> {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "elu";
  /// The map of logits z, elementwise.
  template <typename Scalar, typename A>
  static auto f(const A& z) {
    return (z > Scalar(0)).select(z + Scalar(1), z.exp());
  }
};

/**
 * \brief max(z, 0) + 1e-3 (Choromanski et al. 2021, Performer with ReLU features).
 *
 * Output >= 1e-3; the offset keeps the normaliser away from zero.
 */
struct Relu : detail::ElementwiseFeatureMap<Relu> {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "relu";
  /// The map of logits z, elementwise.
  template <typename Scalar, typename A>
  static auto f(const A& z) {
    return z.max(Scalar(0)) + Scalar(1e-3);
  }
};

/// \brief z^2. Output >= 0 (zero rows give a zero normaliser: eps keeps the division finite).
struct Square : detail::ElementwiseFeatureMap<Square> {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "square";
  /// The map of logits z, elementwise.
  template <typename Scalar, typename A>
  static auto f(const A& z) {
    return z.square();
  }
};

/// \brief z. Output of any sign: the normaliser q'.z can vanish or change sign (as in the
/// reference); used by the softmax part of begin_kernel.
struct Identity : detail::ElementwiseFeatureMap<Identity> {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "identity";
  /// The map of logits z, elementwise.
  template <typename Scalar, typename A>
  static auto f(const A& z) {
    return z;
  }
};

namespace detail {

/// Shared body of exp and expmod: phi = h(x) exp(z - M) / sqrt(m). M is the shift the caller
/// chose (the reference: the largest logit of the batch row); it cancels in attention up to
/// the eps of the normaliser. LogH gives log h(x) per row.
template <typename Derived>
struct MaxShiftedFeatureMap {
  /// z = x P^T (or x): the logits whose maximum the reference subtracts.
  template <typename Scalar>
  void logits(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> out) const {
    randomFeatureLogits(in, out);
  }
  /// Turns logits in place into features, with shift M. Output in [0, h(x)/sqrt(m)]:
  /// exp never overflows as long as M >= every logit of the block.
  template <typename Scalar>
  void finish(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> z, Scalar shift) const {
    const Scalar log_norm = std::log(featureNormaliser(in.projection));
    for (Index r = 0; r < z.rows(); ++r) {
      const Scalar offset = Derived::logH(in.x.row(r)) + log_norm - shift;
      z.row(r) = (z.row(r).array() + offset).exp().matrix();
    }
  }
  /// One block on its own, shifted by its own maximum logit (for users and tests).
  template <typename Scalar>
  void operator()(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> out) const {
    logits(in, out);
    finish(in, out, out.size() ? out.maxCoeff() : Scalar(0));
  }
};

}  // namespace detail

/**
 * \brief Positive random features for the softmax kernel, FAVOR+ (Choromanski et al. 2021,
 * Lemma 1): phi(x) = exp(-|x|^2/2) exp(x P^T - M) / sqrt(m).
 *
 * Output in [0, 1/sqrt(m)]; the shift M (largest logit of the batch row, SPEC 2) keeps exp
 * from overflowing for any finite input; h underflows to 0 for |x|^2 > ~200 (float) or ~1400
 * (double), giving zero features (the eps of the normaliser then keeps outputs finite).
 */
struct Exp : detail::MaxShiftedFeatureMap<Exp> {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "exp";
  /// log h(x) = -|x|^2 / 2 of one row x [d].
  template <typename Row>
  static typename Row::Scalar logH(const Row& x) {
    return -x.squaredNorm() / typename Row::Scalar(2);
  }
};

/**
 * \brief exp with a constant h: phi(x) = exp(-sqrt(d)/2) exp(x P^T - M) / sqrt(m).
 *
 * Output in [0, exp(-sqrt(d)/2)/sqrt(m)]; never overflows (shifted by the maximum logit).
 */
struct ExpMod : detail::MaxShiftedFeatureMap<ExpMod> {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "expmod";
  /// log h = -sqrt(d) / 2, whatever the row x [d].
  template <typename Row>
  static typename Row::Scalar logH(const Row& x) {
    using Scalar = typename Row::Scalar;
    return -std::sqrt(Scalar(x.size())) / Scalar(2);
  }
};

/**
 * \brief FAVOR++ positive random features with data-dependent coefficients (Likhosherstov et al.
 * 2022, "Chefs' Random Tables", OPRF). SPEC section 2 gives the formulas.
 *
 * Needs a projection; without one it returns x unchanged (as the reference). Its coefficients
 * use statistics of the whole query and key sequences, so it is bidirectional only: in a
 * causal pass the coefficients see the future. Output > 0 (>= 1e-6 Dc/sqrt(m)).
 */
struct ExpPlus {
  /// The feature_transform value that selects this map.
  static constexpr const char* name = "expplus";

  /// Coefficients of one (batch row, head).
  template <typename Scalar>
  struct Coefficients {
    ///@{
    /// A, B and D of OPRF (SPEC section 2).
    Scalar A, B, D;
    ///@}
  };

  /// Statistics of one side of one (batch row, head): sum of squares and the row sum of x.
  template <typename Scalar>
  struct SideStatistics {
    Scalar sum_squares = 0;  ///< sum of |x_t|^2 over the rows
    Vector<Scalar> sum;      ///< [d], sum of the rows x_t
    Index length = 0;        ///< number of rows L
  };

  /// The statistics of rows x [L, d].
  template <typename Scalar>
  static SideStatistics<Scalar> statistics(const ConstFeatureBlock<Scalar>& x) {
    SideStatistics<Scalar> s;
    s.sum_squares = x.squaredNorm();
    s.sum = x.colwise().sum().transpose();
    s.length = x.rows();
    return s;
  }

  /// A, Bc, Dc for data x (length L) against the other side y; both sums are divided by x's
  /// length L, as the reference does.
  template <typename Scalar>
  static Coefficients<Scalar> coefficients(const SideStatistics<Scalar>& x,
                                           const SideStatistics<Scalar>& y, Index d) {
    const Scalar c2 = Scalar(1) / std::sqrt(Scalar(d));
    const Scalar L = Scalar(x.length);
    const Scalar dd = Scalar(d);
    const Scalar ave = c2 * (x.sum_squares + y.sum_squares) / L +
                       Scalar(2) * c2 * x.sum.dot(y.sum) / (L * L);
    const Scalar a0 =
        (std::sqrt((Scalar(2) * ave + dd) * (Scalar(2) * ave + dd) + Scalar(8) * dd * ave) -
         Scalar(2) * ave - dd) / (Scalar(4) * ave);
    Coefficients<Scalar> k;
    k.A = (Scalar(1) - Scalar(1) / a0) / Scalar(8);
    k.B = std::sqrt(Scalar(1) - Scalar(4) * k.A);
    k.D = std::pow(Scalar(1) - Scalar(4) * k.A, dd / Scalar(4));
    return k;
  }

  /// u = c x P^T with c = d^(-1/4).
  template <typename Scalar>
  void logits(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> out) const {
    detail::randomFeatureLogits(in, out);
    out *= Scalar(1) / std::sqrt(std::sqrt(Scalar(in.x.cols())));
  }

  /// Turns u in place into features. `key_max` is the largest u over the whole key tensor
  /// (used for keys); queries are stabilised per row.
  template <typename Scalar>
  void finish(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> u,
              const Coefficients<Scalar>& k, Scalar key_max) const {
    const Matrix<Scalar>& P = *in.projection;
    const Scalar c2 = Scalar(1) / std::sqrt(Scalar(in.x.cols()));
    const Vector<Scalar> w = k.A * P.rowwise().squaredNorm();
    const Scalar outer = k.D / std::sqrt(Scalar(P.rows()));
    for (Index r = 0; r < u.rows(); ++r) {
      const Scalar g = c2 * in.x.row(r).squaredNorm() / Scalar(2);
      const Scalar st = k.B * (in.is_query ? u.row(r).maxCoeff() : key_max);
      u.row(r) = (outer * ((k.B * u.row(r).array() - st - g + w.transpose().array()).exp() +
                           Scalar(1e-6)))
                     .matrix();
    }
  }

  /// Without a projection expplus is the identity, as in the reference. With one, a block on
  /// its own against itself (both sides x): for users and tests; the layer uses the pair form.
  template <typename Scalar>
  void operator()(const FeatureInput<Scalar>& in, FeatureBlock<Scalar> out) const {
    if (!in.projection) {
      out = in.x;
      return;
    }
    const auto s = statistics<Scalar>(in.x);
    logits(in, out);
    finish(in, out, coefficients(s, s, in.x.cols()), out.size() ? out.maxCoeff() : Scalar(0));
  }
};

/// exp (and expmod, which inherits it): features shifted by the maximum logit of a batch row.
template <>
struct feature_map_traits<Exp> {
  static constexpr bool bidirectional_only = false;  ///< streams
  static constexpr bool max_shifted = true;          ///< exposes logits and finish
  static constexpr bool pair_statistics = false;     ///< one side at a time
};

template <>
struct feature_map_traits<ExpMod> : feature_map_traits<Exp> {};

/// expplus: coefficients from both sides' whole sequences, so bidirectional only.
template <>
struct feature_map_traits<ExpPlus> {
  static constexpr bool bidirectional_only = true;  ///< cannot stream
  static constexpr bool max_shifted = false;        ///< shifted by its own key stabiliser
  static constexpr bool pair_statistics = true;     ///< needs statistics of both sides
};

/// Whether F can be used as a feature map for Scalar (callable with the block contract).
template <typename F, typename Scalar, typename = void>
struct is_feature_map : std::false_type {};

template <typename F, typename Scalar>
struct is_feature_map<F, Scalar,
                      std::void_t<decltype(std::declval<const F&>()(
                          std::declval<const FeatureInput<Scalar>&>(),
                          std::declval<FeatureBlock<Scalar>>())),
                                  decltype(F::name)>> : std::true_type {};

/// is_feature_map<F, Scalar>::value.
template <typename F, typename Scalar>
inline constexpr bool is_feature_map_v = is_feature_map<F, Scalar>::value;

}  // namespace kattn
