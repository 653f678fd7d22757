#pragma once
// What the gradient tests share (gradients_test, causal_gradients_test): the built-in maps as
// types for a generic lambda, and expplus with its coefficients frozen, whose forward is the
// function the backward differentiates.

#include <cstddef>
#include <vector>

#include <kattn/kattn.hpp>

namespace kattn_test {

using kattn::Index;

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
