#pragma once
/// \file
/// Essential floating-point operations of every kattn_bench workload (issue 8), so that each
/// benchmark's `flops` counter gives a rate comparable with the SGEMM ceiling of the same run.
///
/// How we count, everywhere:
/// - A multiply-add of a matrix product counts 2 (the GEMM convention: an [M, K] by [K, N]
///   product is 2 M K N).
/// - The normaliser counts as one more value column: z = k'^T 1 is an [S, m] by [S, 1]
///   product (2 S m) and the denominator q' z an [T, m] by [m, 1] product (2 T m). This is
///   also what the "ones column appended to v" implementation executes.
/// - Not counted: elementwise work (scaling, relu, exp, the division by the normaliser, the
///   masking), reductions other than the normaliser (softmax's row maximum and sum), bias
///   additions and data movement. Those are real costs, but a kernel is judged by how close
///   its products come to the GEMM rate, so they are what it must hide.
/// - "Essential" means the work of the algorithm the workload is about, not of a particular
///   implementation: the kattn workloads count the linear-in-T (low-rank / prefix-sum) form
///   even when the cost model runs the explicit T x S form; only the `explicit` benchmarks,
///   which force that form, count its own products (explicitCore).
///
/// Symbols: B batch rows, N heads, T queries, S keys (S = T for causal attention), d key_dim,
/// d_v value_dim, m features per head (m = num_random_features with a projection; m = d
/// without one), D model (input) dim, O output dim.

namespace kattn_bench {
namespace flops {

/// Dense layer x [L, D_in] times W [D_in, D_out]: 2 L D_in D_out.
constexpr double dense(double L, double d_in, double d_out) { return 2 * L * d_in * d_out; }

/**
 * Bidirectional kernel attention core, all heads: from scaled per-head q [T, d], k [S, d],
 * v [S, d_v] to outputs [T, d_v], feature maps included.
 *
 * Per head:
 * - with a projection P [m, d]: the feature products q P^T and k P^T, 2 T m d + 2 S m d
 *   (none without a projection: the features are elementwise);
 * - KV = k'^T v: 2 S m d_v;
 * - readout q' KV: 2 T m d_v;
 * - normaliser z = k'^T 1 and q' z: 2 (S + T) m.
 */
constexpr double bidirectionalCore(double B, double N, double T, double S, double d, double m,
                                   double dv, bool projected) {
  const double features = projected ? 2 * T * m * d + 2 * S * m * d : 0;
  return B * N * (features + 2 * S * m * dv + 2 * T * m * dv + 2 * (S + T) * m);
}

/**
 * The same function through the explicit T x S matrix (the `explicit` benchmarks only), all
 * heads. Per head: the feature products as above, scores q' k'^T 2 T S m, readout scores v
 * 2 T S d_v, normaliser (row sums) 2 T S.
 */
constexpr double explicitCore(double B, double N, double T, double S, double d, double m,
                              double dv, bool projected) {
  const double features = projected ? 2 * T * m * d + 2 * S * m * d : 0;
  return B * N * (features + 2 * T * S * m + 2 * T * S * dv + 2 * T * S);
}

/**
 * Causal (prefix-sum) kernel attention core, all heads, T tokens: per token the state update
 * KV += k'_t v_t^T (2 m d_v), the readout q'_t KV (2 m d_v) and the normaliser (z += k'_t and
 * q'_t z, 4 m), plus the feature products with a projection (4 m d). That is exactly
 * bidirectionalCore with S = T: causality removes no essential work from the linear form
 * (the intra-chunk products of a chunked implementation are its own overhead, not counted).
 */
constexpr double causalCore(double B, double N, double T, double d, double m, double dv,
                            bool projected) {
  return bidirectionalCore(B, N, T, T, d, m, dv, projected);
}

/// One streaming decode step of every head (B rows, one token each): causalCore with T = 1.
constexpr double streamingToken(double B, double N, double d, double m, double dv,
                                bool projected) {
  return causalCore(B, N, 1, d, m, dv, projected);
}

/**
 * Exact softmax attention, all heads: scores q k^T (2 d per query-key pair) and the weighted
 * sum p v (2 d_v per pair); the T S exponentials and the row maxima and sums are not counted.
 * Bidirectional: T S pairs. Causal (S = T): T (T + 1) / 2 pairs, about half.
 */
constexpr double softmaxAttention(double B, double N, double T, double S, double d, double dv,
                                  bool causal) {
  const double pairs = causal ? T * (T + 1) / 2 : T * S;
  return B * N * pairs * 2 * (d + dv);
}

/**
 * A whole layer (forward(x, x): self-attention, S = T): the q, k and v projections
 * [T, D] x [D, N d] (twice) and [T, D] x [D, N d_v], the core, and the output projection
 * [T, N d_v] x [N d_v, O]. Also the causal layer's count (causalCore is bidirectionalCore with
 * S = T).
 */
constexpr double layer(double B, double N, double T, double D, double d, double m, double dv,
                       double O, bool projected) {
  const double projections = B * (2 * dense(T, D, N * d) + dense(T, D, N * dv));
  const double output = B * dense(T, N * dv, O);
  return projections + bidirectionalCore(B, N, T, T, d, m, dv, projected) + output;
}

/**
 * The backward of bidirectionalCore, all heads: from d out [T, d_v] per head to d q, d k,
 * d v. The normaliser is one more value column, as in the forward: with v~ = [v, 1] (d_v + 1
 * columns) and KV~ = k'^T v~ [m, d_v + 1], the backward's products per head are
 * - d q' = d out~ KV~^T: 2 T m (d_v + 1);
 * - d KV~ = q'^T d out~: 2 T m (d_v + 1);
 * - d k' = v~ d KV~^T: 2 S m (d_v + 1);
 * - d v = k' d KV (the value columns only): 2 S m d_v;
 * - with a projection, back through the feature products: d q = (d q' f') P and
 *   d k = (d k' f') P, 2 T m d + 2 S m d.
 * Not counted, as in the forward: the elementwise work (the derivative of the map, of the
 * division by the normaliser, the exp maps' shifts and expplus's statistics), and the forward
 * an implementation recomputes inside its backward instead of storing it (kattn does: that is
 * its own cost, not the algorithm's). So the essential forward plus backward is about 3 times
 * the forward, and a training step that ran at the forward's rate would take 3 forwards.
 */
constexpr double bidirectionalCoreBackward(double B, double N, double T, double S, double d,
                                           double m, double dv, bool projected) {
  const double features = projected ? 2 * T * m * d + 2 * S * m * d : 0;
  return B * N *
         (features + 2 * 2 * T * m * (dv + 1) + 2 * S * m * (dv + 1) + 2 * S * m * dv);
}

/**
 * The backward of `layer` (self-attention, S = T): each dense layer's backward is two products
 * the size of its forward (d W = x^T d h and d x = d h W^T), so twice the projections and the
 * output projection, plus the core's backward. Bias gradients (column sums) and the sum of the
 * query, key and value inputs' gradients (x is all three) are not counted.
 */
constexpr double layerBackward(double B, double N, double T, double D, double d, double m,
                               double dv, double O, bool projected) {
  const double projections = B * (2 * dense(T, D, N * d) + dense(T, D, N * dv));
  const double output = B * dense(T, N * dv, O);
  return 2 * (projections + output) + bidirectionalCoreBackward(B, N, T, T, d, m, dv, projected);
}

/// SGEMM [M, K] x [K, N]: 2 M K N.
constexpr double gemm(double M, double K, double N) { return 2 * M * K * N; }

}  // namespace flops
}  // namespace kattn_bench
