#pragma once
/// \file
/// \private The boundary checks of a call: every tensor's shape against the layer and the
/// others (std::invalid_argument naming the tensor), and the per batch row scales.

#include <cmath>
#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../tensor.hpp"
#include "pass.hpp"

namespace kattn {
namespace detail {

/// forward()'s inputs, checked: query [B, T, D_q], value [B, S, D_v], key [B, S, D_k] or absent
/// (the value input is then the key input), mask [B, S]; a causal layer needs S = T.
template <typename Scalar>
CallInputs<Scalar> inputsCall(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
                 const std::optional<ConstTensorMap<Scalar, 3>>& key,
                 const std::optional<ConstTensorMap<Scalar, 2>>& mask, bool causal, Index Dq,
                 Index Dv, Index Dk) {
  const Index B = query.dimension(0), T = query.dimension(1), S = value.dimension(1);
  checkShape<3>("query", query.dimensions(), {-1, -1, Dq});
  checkShape<3>("value", value.dimensions(), {B, -1, Dv});
  if (key) {
    checkShape<3>("key", key->dimensions(), {B, S, Dk});
  } else if (Dk != Dv) {
    throw std::invalid_argument("key: absent, so the value input is the key input, but "
                                "key/kernel expects last dim " + std::to_string(Dk) +
                                " and value has " + std::to_string(Dv));
  }
  if (mask) checkShape<2>("attention_mask", mask->dimensions(), {B, S});
  if (causal && S != T) {
    throw std::invalid_argument("value: causal attention needs as many keys as queries (T = " +
                                std::to_string(T) + "), got S = " + std::to_string(S));
  }
  // Aggregate initialisation: Eigen's TensorMap assigns element by element, so the maps are
  // bound here, never assigned.
  return CallInputs<Scalar>{RowSource::Projections, B, T, S, mask ? mask->data() : nullptr,
                            query, value, key ? *key : value};
}

/// For a layer whose weights its first forward drew: an input of another width than that call's
/// is refused with the reason its width is fixed.
template <typename Scalar>
void checkFirstCallWidths(const ConstTensorMap<Scalar, 3>& query,
                          const ConstTensorMap<Scalar, 3>& value,
                          const std::optional<ConstTensorMap<Scalar, 3>>& key, Index Dq, Index Dv,
                          Index Dk) {
  auto check = [](const std::string& what, Index got, Index built) {
    if (got == built) return;
    throw std::invalid_argument(what + ": the layer was built for " + what + " width " +
                                std::to_string(built) +
                                " on its first call (its weights were drawn then); got width " +
                                std::to_string(got));
  };
  check("query", query.dimension(2), Dq);
  check("value", value.dimension(2), Dv);
  if (key) check("key", key->dimension(2), Dk);
}

/// attend()'s heads, checked: q [B, T, N, d], k [B, S, N, d], v [B, S, N, d_v], mask [B, S],
/// and the output heads [B, T, N, d_v]; a causal layer needs S = T.
template <typename Scalar>
CallInputs<Scalar> headsCall(const ConstTensorMap<Scalar, 4>& q, const ConstTensorMap<Scalar, 4>& k,
                const ConstTensorMap<Scalar, 4>& v,
                const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                const TensorMap<Scalar, 4>& heads, const HeadDims& dims, bool causal) {
  const Index B = q.dimension(0), T = q.dimension(1), S = k.dimension(1);
  checkShape<4>("heads", heads.dimensions(), {B, T, dims.heads, dims.value_dim});
  checkShape<4>("q", q.dimensions(), {-1, -1, dims.heads, dims.key_dim});
  checkShape<4>("k", k.dimensions(), {B, -1, dims.heads, dims.key_dim});
  checkShape<4>("v", v.dimensions(), {B, S, dims.heads, dims.value_dim});
  if (mask) checkShape<2>("attention_mask", mask->dimensions(), {B, S});
  if (causal && S != T) {
    throw std::invalid_argument("k: causal attention needs as many keys as queries (T = " +
                                std::to_string(T) + "), got S = " + std::to_string(S));
  }
  CallInputs<Scalar> in;
  in.source = RowSource::Heads;
  in.B = B;
  in.T = T;
  in.S = S;
  in.mask = mask ? mask->data() : nullptr;
  in.q_heads = q.data();
  in.k_heads = k.data();
  in.v_heads = v.data();
  return in;
}

/// The scales of a call: `scale`, or with scale_by_length
/// scale ln(sum_j mask[b, j]) / ln(512), which needs a mask whose rows sum to at least 1.
template <typename Scalar>
BatchScales<Scalar> batchScales(double scale, bool scale_by_length, const CallInputs<Scalar>& in) {
  BatchScales<Scalar> s{Scalar(scale), {}};
  if (!scale_by_length) return s;
  if (!in.mask) {
    throw std::invalid_argument("attention_mask: scale_by_length needs a mask (none given)");
  }
  s.rows.assign(std::size_t(in.B), Scalar(scale));
  for (Index b = 0; b < in.B; ++b) {
    Scalar total = 0;
    for (Index j = 0; j < in.S; ++j) total += in.mask[b * in.S + j];
    if (!(total >= Scalar(1))) {
      throw std::invalid_argument("attention_mask: scale_by_length needs every row to sum to at "
                                  "least 1; row " + std::to_string(b) + " sums to " +
                                  numberString(double(total)));
    }
    s.rows[std::size_t(b)] = Scalar(scale) * std::log(total) / std::log(Scalar(512));
  }
  return s;
}

}  // namespace detail
}  // namespace kattn
