#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/safetensors/ (standard library only).

The golden cases cover F64 tensors of rank 1-4; these seeds add what they lack: the other
dtypes (F32, F16, BF16, metadata-only I64/U8/F4), scalars, empty and high-rank tensors,
gaps between tensors, unknown entry fields and an empty file. Rerun after changing them:
    python3 fuzz/make_seeds.py
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "safetensors")


def write(name, tensors, metadata=None, pad=True, gap=0):
    """tensors: list of (name, dtype, shape, raw bytes, extra fields)."""
    header, data = {}, b""
    for tname, dtype, shape, raw, extra in tensors:
        data += b"\x00" * gap
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        entry.update(extra)
        header[tname] = entry
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def u16(*v):
    return struct.pack("<%dH" % len(v), *v)


os.makedirs(OUT, exist_ok=True)
write("mixed_dtypes.safetensors", [
    ("f32", "F32", [2, 3], f32(1, -2, 0.5, float("inf"), -0.0, 1e-45), {}),
    ("f16", "F16", [4], u16(0x3C00, 0x0001, 0x7C00, 0xFE00), {}),
    ("bf16", "BF16", [2, 2], u16(0x3F80, 0x0001, 0xFF80, 0x7FC1), {}),
    ("ids", "I64", [1], struct.pack("<q", -5), {}),
    ("mask", "U8", [3], b"\x01\x00\x01", {}),
    ("q4", "F4", [2, 2], b"\x12\x34", {}),
    ("scalar", "F64", [], struct.pack("<d", 3.25), {}),
    ("empty", "F64", [0, 3], b"", {}),
], metadata={"format": "pt", "note": "seed"})
write("high_rank.safetensors", [
    ("r5", "F32", [1, 2, 1, 1, 2], f32(1, 2, 3, 4), {}),
    ("r6", "F16", [1, 1, 1, 1, 1, 2], u16(0x3C00, 0x4000), {}),
    ("r7", "BF16", [1, 1, 1, 1, 1, 1, 1], u16(0x3F80), {}),
])
write("gaps_and_extras.safetensors", [
    ("a", "F32", [1], f32(7), {"future": {"field": [1, 2]}}),
    ("b", "BF16", [2], u16(0x4049, 0xC000), {}),
], gap=3, pad=False)
write("empty.safetensors", [])
write("metadata_only.safetensors", [], metadata={"k": "v", "": "\u00e9\n"})
