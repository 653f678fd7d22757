#pragma once
// What the gradient tests share (gradients_test, causal_gradients_test,
// gradients_training_test): random inputs, central differences, the error measure, weights by
// name, the built-in maps as types for a generic lambda, and expplus with its coefficients
// frozen, whose forward is the function the backward differentiates.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <kattn/kattn.hpp>

namespace kattn_test {

using kattn::Index;

/// max |x - ref| / max |ref| over two arrays of n entries (0 when both are zero).
template <typename A, typename B>
double relError(const A* x, const B* ref, Index n) {
  double err = 0, scale = 0;
  for (Index i = 0; i < n; ++i) {
    err = std::max(err, std::abs(double(x[i]) - double(ref[i])));
    scale = std::max(scale, std::abs(double(ref[i])));
  }
  return scale > 0 ? err / scale : err;
}

/// A float64 tensor of the given dims, entries offset + N(0, sd^2).
template <int R>
kattn::Tensor<double, R> randomTensor(std::mt19937_64& gen, double sd,
                                      const std::array<Index, R>& dims, double offset = 0) {
  kattn::Tensor<double, R> t(dims);
  std::normal_distribution<double> nd(0.0, sd);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = offset + nd(gen);
  return t;
}

/// Central differences of f over every entry of x [n] (x restored after each), step 1e-5.
inline std::vector<double> centralDifferences(double* x, Index n, const std::function<double()>& f) {
  const double h = 1e-5;
  std::vector<double> out(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double up = f();
    x[i] = x0 - h;
    const double down = f();
    x[i] = x0;
    out[std::size_t(i)] = (up - down) / (2 * h);
  }
  return out;
}

/// The entries of the weight `name` (a Keras name of Gradients::named()).
template <typename Scalar>
Scalar* weightData(kattn::Weights<Scalar>& w, const std::string& name) {
  if (name == "query/kernel") return w.query_kernel.data();
  if (name == "query/bias") return w.query_bias.data();
  if (name == "key/kernel") return w.key_kernel.data();
  if (name == "key/bias") return w.key_bias.data();
  if (name == "value/kernel") return w.value_kernel.data();
  if (name == "value/bias") return w.value_bias.data();
  if (name == "attention_output/kernel") return w.output_kernel.data();
  if (name == "attention_output/bias") return w.output_bias.data();
  if (name == "attention_output_softmax/kernel") return w.output_softmax_kernel.data();
  if (name == "attention_output_softmax/bias") return w.output_softmax_bias.data();
  ADD_FAILURE() << "no weight " << name;
  return nullptr;
}

/// A float64 tensor as float32 (the float32 checks take the float64 problem).
template <int R>
kattn::Tensor<float, R> toFloat(const kattn::Tensor<double, R>& t) {
  return t.template cast<float>();
}

/// Every built-in map, as a type, for a generic lambda.
template <typename Map>
struct Tag {
  using type = Map;
};
template <typename Fn>
void forEachMap(const Fn& fn) {
  fn(Tag<kattn::Elu>{});
  fn(Tag<kattn::Relu>{});
  fn(Tag<kattn::Square>{});
  fn(Tag<kattn::Identity>{});
  fn(Tag<kattn::Exp>{});
  fn(Tag<kattn::ExpMod>{});
  fn(Tag<kattn::ExpPlus>{});
}

/**
 * expplus with its coefficients A, B, D frozen: the function whose derivative backward
 * computes (the reference holds them constant by stop_gradient), for finite differences of
 * the layer's own forward. Recording, it computes them as expplus and keeps them in call
 * order; replaying, it returns them again in that order (the layer, bidirectional or causal,
 * asks for them serially per batch row and head, the same number of times per forward).
 */
struct FrozenExpPlus : kattn::ExpPlus {
  static constexpr const char* name = "frozen_expplus";
  struct Table {
    bool replay = false;
    std::vector<Coefficients<double>> coefficients;
    std::size_t next = 0;
  };
  static Table& table() {
    static Table t;
    return t;
  }
  static Coefficients<double> coefficients(const SideStatistics<double>& x,
                                           const SideStatistics<double>& y, Index d) {
    Table& t = table();
    if (!t.replay) {
      t.coefficients.push_back(kattn::ExpPlus::coefficients(x, y, d));
      return t.coefficients.back();
    }
    return t.coefficients[t.next++ % t.coefficients.size()];
  }
};

}  // namespace kattn_test

template <>
struct kattn::feature_map_traits<kattn_test::FrozenExpPlus>
    : kattn::feature_map_traits<kattn::ExpPlus> {};

namespace kattn_test {

/// The map whose forward finite differences see: Map itself, expplus with frozen coefficients.
template <typename Map>
struct LossMap {
  using type = Map;
};
template <>
struct LossMap<kattn::ExpPlus> {
  using type = FrozenExpPlus;
};

}  // namespace kattn_test
