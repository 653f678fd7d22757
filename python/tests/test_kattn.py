"""Tests of the Python module kattn: the golden cases through the Python API, streaming,
state save/load, the library's errors as Python exceptions, and reading inputs in place.

Run from the repository root, with the built module on PYTHONPATH and the golden data in
$KATTN_SHARED_DIR/cases (default: ../shared/cases beside the repository):

    PYTHONPATH=build/python python3 -m unittest discover -s python/tests -v
"""

import copy
import json
import os
import struct
import threading
import tracemalloc
import unittest

import numpy as np

import kattn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("KATTN_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
CASES = os.path.join(SHARED, "cases")

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def read_safetensors(path):
    """Every tensor of a safetensors file as a read-only numpy array: an 8-byte little-endian
    header length, a JSON header (name -> dtype, shape, data_offsets), then the data."""
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    dtypes = {"F64": "<f8", "F32": "<f4", "I64": "<i8", "I32": "<i4"}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(dtypes[info["dtype"]])
        tensors[name] = np.frombuffer(blob, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                      offset=8 + length + begin).reshape(info["shape"])
    return tensors


def relative_error(got, want):
    """max |got - want| / max |want| (absolute when want is all zero; inf for NaN)."""
    err = np.max(np.abs(got.astype(np.float64) - want), initial=0.0)
    ref = np.max(np.abs(want), initial=0.0)
    if np.isnan(err):
        return np.inf
    return err / ref if ref > 0 else err


WEIGHT_NAMES = ["query/kernel", "query/bias", "key/kernel", "key/bias", "value/kernel",
                "value/bias", "attention_output/kernel", "attention_output/bias",
                "attention_output_softmax/kernel", "attention_output_softmax/bias"]


class GoldenCases(unittest.TestCase):
    """Every golden case (70), in float64 and float32, through the Python API."""

    @classmethod
    def setUpClass(cls):
        index = os.path.join(CASES, "index.json")
        if not os.path.exists(index):
            raise FileNotFoundError(f"no golden cases at {CASES}: set KATTN_SHARED_DIR")
        with open(index) as f:
            cls.names = [c["name"] for c in json.load(f)]

    def test_index_has_all_seventy_cases(self):
        self.assertEqual(len(self.names), 70)

    def layer(self, meta, data, dtype):
        layer = kattn.KernelAttention(meta["config"], dtype)
        layer.set_weights({n: data[n] for n in WEIGHT_NAMES if n in data})
        if "projection_matrix" in data:
            layer.projection = data["projection_matrix"]
        return layer

    def run_call(self, meta, data, dtype):
        layer = self.layer(meta, data, dtype)
        out = layer.forward(data["query"], data["value"], key=data.get("key"),
                            mask=data.get("attention_mask"))
        self.assertEqual(out.dtype, np.dtype(dtype))
        self.assertEqual(out.shape, data["expected/output"].shape)
        self.assertLessEqual(relative_error(out, data["expected/output"]), TOLERANCE[dtype])

    def run_stream(self, meta, data, dtype):
        layer = self.layer(meta, data, dtype)
        query, value, mask = data["query"], data["value"], data.get("attention_mask")
        state = layer.make_state(query.shape[0], "recurrent")
        if "cache/kv" in data:
            state.set_cache(data["cache/kv"], data["cache/k_sum"])
        outs, t0 = [], 0
        for length in meta["stream_chunk_lengths"]:
            t = slice(t0, t0 + length)
            outs.append(layer.forward(query[:, t], value[:, t],
                                      mask=None if mask is None else mask[:, t], state=state))
            t0 += length
        self.assertEqual(t0, query.shape[1])
        tol = TOLERANCE[dtype]
        self.assertLessEqual(relative_error(np.concatenate(outs, axis=1), data["expected/output"]),
                             tol)
        self.assertLessEqual(relative_error(state.kv(), data["expected/cache/kv"]), tol)
        self.assertLessEqual(relative_error(state.k_sum(), data["expected/cache/k_sum"]), tol)

    def test_every_case(self):
        for name in self.names:
            with open(os.path.join(CASES, name + ".json")) as f:
                meta = json.load(f)
            data = read_safetensors(os.path.join(CASES, name + ".safetensors"))
            for dtype in ("float64", "float32"):
                with self.subTest(case=name, dtype=dtype):
                    if meta["mode"] == "stream":
                        self.run_stream(meta, data, dtype)
                    else:
                        self.run_call(meta, data, dtype)


def causal_layer(dtype, feature_transform="elu", **options):
    config = {"num_heads": 2, "key_dim": 4, "value_dim": 3, "output_shape": 5,
              "feature_transform": feature_transform, "num_random_features": 8,
              "use_causal_windowed": True, "causal_chunk_length": 1,
              "causal_window_length": 3, "seed": 7}
    config.update(options)
    layer = kattn.KernelAttention(config, dtype)
    layer.initialize_weights(6, 6)
    return layer


class Streaming(unittest.TestCase):
    B, T, D = 2, 11, 6

    def inputs(self, dtype, seed=1):
        return np.random.default_rng(seed).standard_normal((self.B, self.T, self.D)).astype(dtype)

    # Not the exp maps: their whole pass and a stream differ by design in the eps term
    # (docs/causal_streaming.md); the save/load test below runs exp.
    def test_token_by_token_steps_equal_the_causal_forward(self):
        for dtype in ("float64", "float32"):
            for feature_transform in ("elu", "relu"):
                with self.subTest(dtype=dtype, feature_transform=feature_transform):
                    layer = causal_layer(dtype, feature_transform)
                    x = self.inputs(dtype)
                    whole = layer.forward(x, x)
                    state = layer.make_state(self.B)
                    self.assertEqual(state.mode, "exact")
                    steps = [layer.step(x[:, t], state) for t in range(self.T)]
                    self.assertEqual(steps[0].shape, (self.B, 5))
                    self.assertEqual(state.tokens, self.T)
                    self.assertLessEqual(relative_error(np.stack(steps, axis=1), whole),
                                         TOLERANCE[dtype])

    def test_calls_of_several_tokens(self):
        layer = causal_layer("float64")
        x = self.inputs("float64")
        whole = layer.forward(x, x)
        by_step, by_forward = layer.make_state(self.B), layer.make_state(self.B)
        a = [layer.step(x[:, t:t + 4], by_step) for t in range(0, self.T, 4)]
        b = [layer.forward(x[:, t:t + 4], x[:, t:t + 4], state=by_forward)
             for t in range(0, self.T, 4)]
        self.assertEqual(a[0].shape, (self.B, 4, 5))
        np.testing.assert_array_equal(np.concatenate(a, axis=1), np.concatenate(b, axis=1))
        self.assertLessEqual(relative_error(np.concatenate(a, axis=1), whole), 1e-10)

    def test_saved_state_continues_identically(self):
        for dtype in ("float64", "float32"):
            for mode in ("exact", "recurrent"):
                with self.subTest(dtype=dtype, mode=mode):
                    layer = causal_layer(dtype, "exp", causal_window_decay=0.9)
                    x = self.inputs(dtype)
                    state = layer.make_state(self.B, mode)
                    for t in range(5):
                        layer.step(x[:, t], state)
                    saved = state.save()
                    self.assertIsInstance(saved, bytes)
                    loaded = kattn.State.load(saved, dtype)
                    self.assertEqual((loaded.mode, loaded.tokens, loaded.dtype),
                                     (mode, 5, np.dtype(dtype)))
                    for t in range(5, self.T):
                        np.testing.assert_array_equal(layer.step(x[:, t], state),
                                                      layer.step(x[:, t], loaded))
                    self.assertEqual(state.save(), loaded.save())

    def test_copy_is_independent(self):
        layer = causal_layer("float64")
        x = self.inputs("float64")
        state = layer.make_state(self.B)
        layer.step(x[:, 0], state)
        other = copy.copy(state)
        np.testing.assert_array_equal(layer.step(x[:, 1], state), layer.step(x[:, 1], other))
        layer.step(x[:, 2], state)
        self.assertEqual((state.tokens, other.tokens), (3, 2))


class Errors(unittest.TestCase):
    """The library's exceptions reach Python with their messages."""

    config = {"num_heads": 2, "key_dim": 4}

    def test_config(self):
        with self.assertRaises(ValueError) as e:
            kattn.KernelAttention({"num_heads": 2})
        self.assertEqual(str(e.exception),
                         'config: missing required key "key_dim" (Keras always writes it)')
        with self.assertRaisesRegex(ValueError, r'^config: unknown key "heads"; valid keys: '):
            kattn.KernelAttention({"heads": 2, "key_dim": 4})
        with self.assertRaises(ValueError) as e:
            kattn.KernelAttention({"num_heads": 2.0, "key_dim": 4})
        self.assertEqual(str(e.exception), "num_heads: expected an integer, got non-integer number 2.0")
        with self.assertRaisesRegex(ValueError, r'^feature_transform: '):
            kattn.KernelAttention({"num_heads": 2, "key_dim": 4, "feature_transform": "tanh"})
        with self.assertRaisesRegex(ValueError, r"^config: not valid JSON: "):
            kattn.KernelAttention("{")

    def test_numpy_scalars_in_a_config_are_their_values(self):
        layer = kattn.KernelAttention({"num_heads": np.int64(2), "key_dim": np.int32(4),
                                       "use_bias": np.bool_(False), "scale": np.float32(0.5)})
        self.assertEqual((layer.config["num_heads"], layer.config["use_bias"],
                          layer.config["scale"]), (2, False, 0.5))

    def test_dtype(self):
        self.assertEqual(kattn.KernelAttention(self.config).dtype, np.float32)
        self.assertEqual(kattn.KernelAttention(self.config, np.float64).dtype, np.float64)
        with self.assertRaisesRegex(ValueError, r"^dtype: kattn computes in float32 or float64"):
            kattn.KernelAttention(self.config, "int32")

    def test_inputs(self):
        layer = kattn.KernelAttention(self.config, "float64")
        layer.initialize_weights(6, 6)
        x = np.zeros((2, 5, 6))
        with self.assertRaises(ValueError) as e:
            layer.forward(x[:, :, :3], x)
        self.assertEqual(str(e.exception), "query: expected shape [*, *, 6], got [2, 5, 3]")
        with self.assertRaisesRegex(ValueError, r"^query: expected an array \[B, T, D_q\] "
                                                r"\(3 dimensions\), got shape \(5, 6\)"):
            layer.forward(x[0], x)
        with self.assertRaisesRegex(ValueError, r"^query/kernel: expected shape \[\*, 2, 4\], "
                                                r"got \[6, 2, 3\]"):
            layer.set_weights({"query/kernel": np.zeros((6, 2, 3))})
        with self.assertRaisesRegex(ValueError, r'^weights: unknown name "query/kernal"'):
            layer.set_weights({"query/kernal": np.zeros((6, 2, 4))})

    def test_streaming(self):
        with self.assertRaises(ValueError) as e:
            kattn.KernelAttention(self.config).make_state(1)
        self.assertEqual(str(e.exception), "cache: a streaming state needs use_causal_windowed = true")
        layer = causal_layer("float64")
        state = layer.make_state(2)
        with self.assertRaises(ValueError) as e:
            layer.step(np.zeros((3, 6)), state)
        self.assertEqual(str(e.exception), "state: made for a batch of 2 rows, but the call has 3 "
                                           "(a state holds one stream per batch row)")
        with self.assertRaisesRegex(ValueError, r"^state: a float32 state cannot feed a float64"):
            layer.step(np.zeros((2, 6)), causal_layer("float32").make_state(2))

    def test_state_load(self):
        with self.assertRaises(RuntimeError) as e:
            kattn.State.load(b"not a state", "float64")
        self.assertEqual(str(e.exception), "StreamingState::load: not a kattn streaming state")
        saved = causal_layer("float64").make_state(2).save()
        with self.assertRaises(RuntimeError) as e:
            kattn.State.load(saved[:-4], "float64")
        self.assertEqual(str(e.exception), "StreamingState::load: truncated stream")
        with self.assertRaises(RuntimeError) as e:
            kattn.State.load(saved, "float32")
        self.assertEqual(str(e.exception), "StreamingState::load: saved with another scalar type")

    def test_memory_limit(self):
        layer = kattn.KernelAttention(self.config)
        layer.initialize_weights(6, 6)
        limit = kattn.memory_limit()
        kattn.set_memory_limit(1024)
        try:
            with self.assertRaisesRegex(kattn.MemoryLimitError, r"^kattn: .* needs "):
                layer.forward(np.zeros((4, 64, 6), np.float32), np.zeros((4, 64, 6), np.float32))
        finally:
            kattn.set_memory_limit(limit)
        self.assertTrue(issubclass(kattn.MemoryLimitError, ValueError))


class Inputs(unittest.TestCase):
    """C-contiguous inputs of the layer's dtype are read in place: numpy reports its own
    allocations to tracemalloc, and the output lives in kattn's memory, so a forward that
    reads in place allocates nothing numpy sees, where a converted input shows its copy."""

    def traced_peak(self, call):
        tracemalloc.start()
        try:
            call()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def test_forward_reads_c_contiguous_inputs_in_place(self):
        layer = kattn.KernelAttention({"num_heads": 1, "key_dim": 2, "output_shape": 2,
                                       "feature_transform": "relu", "num_random_features": 0})
        layer.initialize_weights(256, 256)
        x = np.random.default_rng(0).standard_normal((1, 4096, 256)).astype(np.float32)
        self.assertTrue(x.flags.c_contiguous)
        copied = x.nbytes  # 4 MiB
        self.assertLess(self.traced_peak(lambda: layer.forward(x, x)), copied // 8)
        # The same measurement sees a copy where one is made: another dtype, a strided view.
        x64 = x.astype(np.float64)
        self.assertGreaterEqual(self.traced_peak(lambda: layer.forward(x64, x)), copied)
        strided = np.repeat(x, 2, axis=2)[:, :, ::2]
        self.assertGreaterEqual(self.traced_peak(lambda: layer.forward(strided, x)), copied)
        np.testing.assert_array_equal(layer.forward(strided, x64), layer.forward(x, x))

    def test_output_is_a_fresh_array(self):
        layer = kattn.KernelAttention({"num_heads": 2, "key_dim": 4}, "float64")
        layer.initialize_weights(6, 6)
        x = np.ones((1, 3, 6))
        y = layer.forward(x, x)
        self.assertTrue(y.flags.c_contiguous and y.flags.writeable)
        self.assertFalse(np.shares_memory(x, y))

    def test_weights_and_projection_round_trip(self):
        layer = causal_layer("float64")
        weights = layer.weights()
        self.assertEqual(sorted(weights), sorted(WEIGHT_NAMES[:8]))
        other = kattn.KernelAttention(layer.config, "float64")
        other.set_weights(weights)
        other.projection = layer.projection
        x = np.random.default_rng(2).standard_normal((2, 4, 6))
        np.testing.assert_array_equal(other.forward(x, x), layer.forward(x, x))
        self.assertEqual(layer.projection.shape, (8, 4))
        self.assertIsNone(kattn.KernelAttention({"num_heads": 1, "key_dim": 2,
                                                 "num_random_features": 0}).projection)

    def test_threads_share_a_layer(self):
        layer = causal_layer("float64")
        x = np.random.default_rng(3).standard_normal((2, 64, 6))
        want = layer.forward(x, x)
        got = [None] * 4

        def run(i):
            got[i] = layer.forward(x, x)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g in got:
            np.testing.assert_array_equal(g, want)


if __name__ == "__main__":
    unittest.main()
