#pragma once
/// \file
/// The whole public API of kattn (except io/, which needs nlohmann/json), in dependency order.

#include "parallel.hpp"
#include "tensor.hpp"
#include "limits.hpp"
#include "config.hpp"
#include "feature_maps.hpp"
#include "projection.hpp"
#include "masking.hpp"
#include "streaming.hpp"
#include "weights.hpp"
#include "layer.hpp"
#include "key_summary.hpp"
#include "core.hpp"
#include "gradients.hpp"
#include "saved_features.hpp"
#include "any_layer.hpp"
#include "build_info.hpp"
