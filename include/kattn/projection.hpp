#pragma once
/// \file
/// The seeded orthogonal random projection of the kernel attention layer (Performer's
/// "orthogonal random features"), drawn bit for bit as the reference layer
/// (`tfm.nlp.layers.KernelAttention`, function `create_projection_matrix`) draws it.
///
/// Why it must be bit-exact: the reference does not save the projection in its checkpoints;
/// it rebuilds it from `seed` in its constructor. Loading trained weights into kattn therefore
/// needs the same matrix from the same seed, which means TF's stateless Philox stream
/// (random/philox.hpp), TF's seed chain, and TF's QR convention.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>

#include "kattn/config.hpp"
#include "kattn/limits.hpp"
#include "kattn/random/philox.hpp"
#include "kattn/tensor.hpp"

namespace kattn {

namespace detail {

/// Private: everything the reference draws for one projection, in the order it draws it.
/// Kept apart from the linear algebra so that tests can check each draw bit for bit.
struct ProjectionDraws {
  /// The seed chain: `seeds[b]` draws block b; the last entry draws the multipliers.
  std::vector<random::SeedPair> seeds;
  /// One d x d float32 normal matrix per block (row-major), ceil(m / d) of them.
  std::vector<std::vector<float>> blocks;
  /// The m x d float32 normal matrix (row-major) whose row norms scale the rows.
  std::vector<float> multiplierNormals;
};

/// Private: throws unless m and d are usable sizes; `caller` names the public function.
inline void checkProjectionSizes(const char* caller, Index m, Index d) {
  auto fail = [caller](const std::string& what) {
    throw std::invalid_argument(std::string(caller) + ": " + what);
  };
  if (m < 1) {
    fail("m (num_random_features) must be >= 1, got " + std::to_string(m));
  }
  if (d < 1) {
    fail("d (key_dim) must be >= 1, got " + std::to_string(d));
  }
  // The draws hold max(m, d) * d floats; refuse sizes whose element count overflows Index.
  constexpr Index kMaxElements = std::numeric_limits<Index>::max() / 4;
  if (std::max(m, d) > kMaxElements / d) {
    fail("m (num_random_features) x d (key_dim) = " + std::to_string(m) + " x " +
         std::to_string(d) + " is too large");
  }
}

/// Private: the reference's draws for an m x d projection from TF seed tensor `seed`:
/// `stateless_normal((d, d), seed)` per block, `seed = stateless_uniform([2], seed,
/// minval=None, dtype=int32)` after each, then `stateless_normal((m, d), seed)`.
inline ProjectionDraws drawProjectionNormals(Index m, Index d, const random::SeedPair& seed) {
  const Index numBlocks = (m + d - 1) / d;
  const std::size_t blockSize = static_cast<std::size_t>(d) * static_cast<std::size_t>(d);
  ProjectionDraws draws;
  draws.seeds.reserve(static_cast<std::size_t>(numBlocks) + 1);
  draws.blocks.reserve(static_cast<std::size_t>(numBlocks));
  random::SeedPair current = seed;
  for (Index b = 0; b < numBlocks; ++b) {
    draws.seeds.push_back(current);
    draws.blocks.push_back(random::statelessNormalFloat(current, blockSize));
    current = random::nextSeed(current);
  }
  draws.seeds.push_back(current);
  draws.multiplierNormals = random::statelessNormalFloat(
      current, static_cast<std::size_t>(m) * static_cast<std::size_t>(d));
  return draws;
}

/// Private: checks the seed of randomProjection / redrawProjection and forms the reference's
/// seed tensor `[seed, seed + 1]`.
inline random::SeedPair referenceSeedPair(const char* caller, std::int64_t seed) {
  checkReferenceSeed(caller, seed);
  return random::SeedPair{seed, seed + 1};
}

}  // namespace detail

/**
 * \brief The reference's `create_projection_matrix(m, d, seed)`: an [m, d] matrix whose rows
 * are orthogonal within each block of d rows and scaled to chi-distributed norms.
 *
 * For each of ceil(m / d) blocks: a d x d float32 normal matrix from the current seed, then
 * the seed advances (random::nextSeed); the block is Q^T, Q the thin Q factor of the
 * Householder QR of that matrix (`Eigen::HouseholderQR` on a row-major matrix, no sign
 * normalisation: what `tf.linalg.qr` runs on CPU). The blocks are stacked and the first m rows
 * kept; row i is multiplied by the Euclidean norm of row i of an m x d float32 normal matrix
 * drawn with the final seed.
 *
 * \tparam Scalar float or double: the precision of the QR and of the scaling, applied to the
 *   same float32 normals. float follows TF's arithmetic (equal to it up to QR rounding, a few
 *   ulps); double is the exact value TF's float result approximates.
 * \param m number of random features (rows), `num_random_features`.
 * \param d key dimension (columns), `key_dim`.
 * \param seed the TF seed tensor (two int32 or int64 values).
 * \return the projection, shape [m, d].
 * \throws std::invalid_argument if m < 1, d < 1, or m x d overflows.
 * \note Cost O(ceil(m / d) d^3) for the QRs and O(m d) Philox blocks; memory O(max(m, d) d).
 */
template <typename Scalar>
Matrix<Scalar> createProjectionMatrix(Index m, Index d, const random::SeedPair& seed) {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "createProjectionMatrix computes its QR in float or double; cast the result "
                "for other storage types.");
  detail::checkProjectionSizes("createProjectionMatrix", m, d);
  const detail::ProjectionDraws draws = detail::drawProjectionNormals(m, d, seed);

  using FloatMap = Eigen::Map<const Matrix<float>>;
  Matrix<Scalar> projection(m, d);
  for (std::size_t b = 0; b < draws.blocks.size(); ++b) {
    const Index first = static_cast<Index>(b) * d;
    const Index rows = std::min(d, m - first);
    const Matrix<Scalar> normals = FloatMap(draws.blocks[b].data(), d, d).cast<Scalar>();
    const Eigen::HouseholderQR<Matrix<Scalar>> qr(normals);
    // Thin Q as tf.linalg.qr forms it: Q applied to the identity (d x d, the matrix is square).
    const Matrix<Scalar> q = qr.householderQ() * Matrix<Scalar>::Identity(d, d);
    projection.middleRows(first, rows) = q.transpose().topRows(rows);
  }

  const FloatMap multiplierNormals(draws.multiplierNormals.data(), m, d);
  for (Index i = 0; i < m; ++i) {
    const Scalar norm = multiplierNormals.row(i).cast<Scalar>().norm();
    projection.row(i) *= norm;
  }
  return projection;
}

/**
 * \brief The projection the reference layer builds from its `seed` option: the seed tensor
 * `[seed, seed + 1]` passed to createProjectionMatrix.
 *
 * \tparam Scalar float (TF's arithmetic) or double (the exact target); see
 *   createProjectionMatrix.
 * \param m number of random features, `num_random_features` (>= 1).
 * \param d key dimension, `key_dim` (>= 1).
 * \param seed the layer's `seed`. The reference makes `tf.constant([seed, seed + 1])` int32
 *   when both fit and int64 otherwise, which yields the same stream, so any seed up to
 *   INT64_MAX - 1 is accepted.
 * \return the projection, shape [m, d]; the same arguments always give the same matrix.
 * \throws std::invalid_argument if m < 1, d < 1, or seed == INT64_MAX.
 */
template <typename Scalar>
Matrix<Scalar> randomProjection(Index m, Index d, std::int64_t seed) {
  detail::checkProjectionSizes("randomProjection", m, d);
  return createProjectionMatrix<Scalar>(m, d, detail::referenceSeedPair("randomProjection", seed));
}

/**
 * \brief The k-th fresh projection (k = 0, 1, 2, ...) for training with `redraw=True`,
 * reproducible from the seed and the redraw count.
 *
 * The reference redraws from TF's global stateful RNG, which nothing can reproduce; kattn
 * instead derives redraw k from the layer's seed with TF's own stateless fold-in, so the
 * sequence is reproducible in C++ and in TF alike:
 * ```python
 * seed_k = tf.random.experimental.stateless_fold_in(tf.constant([seed, seed + 1]), k + 1)
 * create_projection_matrix(m, d, seed_k)
 * ```
 * i.e. seed pair [first full-range int32 of [seed, seed + 1], k + 1] (int32). Distinct k give
 * distinct seed pairs, hence distinct Philox keys and counters (the key derivation is a
 * bijection), so redraws never repeat one another. A redraw's seed pair equals the base pair
 * [seed, seed + 1] only if k == seed and the first word equals seed; an exhaustive search over
 * all seeds in [0, INT32_MAX - 1] found no such seed, so no redraw repeats randomProjection.
 *
 * \param m, d the projection's shape [m, d], as in randomProjection.
 * \param seed the layer's `seed`, as in randomProjection.
 * \param k the redraw count, at most INT32_MAX - 1 (k + 1 is an int32 in the fold-in).
 * \throws std::invalid_argument if m < 1, d < 1, seed == INT64_MAX or k > 2147483646.
 */
template <typename Scalar>
Matrix<Scalar> redrawProjection(Index m, Index d, std::int64_t seed, std::uint64_t k) {
  detail::checkProjectionSizes("redrawProjection", m, d);
  const random::SeedPair base = detail::referenceSeedPair("redrawProjection", seed);
  constexpr std::uint64_t kMaxRedraw =
      static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()) - 1;
  if (k > kMaxRedraw) {
    throw std::invalid_argument("redrawProjection: k (redraw count) must be <= 2147483646 "
                                "(k + 1 is folded into the seed as an int32), got " +
                                std::to_string(k));
  }
  const random::SeedPair redrawSeed =
      random::statelessFoldIn(base, static_cast<std::int32_t>(k + 1));
  return createProjectionMatrix<Scalar>(m, d, redrawSeed);
}

namespace detail {

/// A layer's projection from `config`: the reference's, drawn from config.seed, or empty
/// without one. \throws MemoryLimitError past the memory limit.
template <typename Scalar>
Matrix<Scalar> layerProjection(const LayerConfig& config) {
  if (!config.hasProjection()) return Matrix<Scalar>();
  checkAllocation("the projection [num_random_features, key_dim] = [" +
                      std::to_string(config.num_random_features) + ", " +
                      std::to_string(config.key_dim) + "]",
                  double(config.num_random_features) * double(config.key_dim), sizeof(Scalar));
  return randomProjection<Scalar>(config.num_random_features, config.key_dim, config.seed);
}

/// The projection of one call: none, the layer's `P`, or in training with redraw the
/// `call`-th redraw (into `redrawn`, which must outlive the call).
template <typename Scalar>
const Matrix<Scalar>* callProjection(const LayerConfig& config, const Matrix<Scalar>& P,
                                     bool training, std::uint64_t call, Matrix<Scalar>& redrawn) {
  if (!config.hasProjection()) return nullptr;
  if (!(training && config.redraw)) return &P;
  redrawn = redrawProjection<Scalar>(config.num_random_features, config.key_dim, config.seed, call);
  return &redrawn;
}

/// callProjection for a call whose number the caller gave (a TrainingCall): redraw's refusal
/// of the number names it as `training_call`. The layer's sizes and seed passed the same
/// checks at construction, so only the number can fail.
template <typename Scalar>
const Matrix<Scalar>* givenCallProjection(const LayerConfig& config, const Matrix<Scalar>& P,
                                          bool training, std::uint64_t call,
                                          Matrix<Scalar>& redrawn) {
  try {
    return callProjection(config, P, training, call, redrawn);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("training_call: ") + e.what());
  }
}

}  // namespace detail

}  // namespace kattn
