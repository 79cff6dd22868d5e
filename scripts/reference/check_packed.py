#!/usr/bin/env python3
"""Reads a file written by `selfsup pack` with h5py (an independent HDF5 reader; hdf5plugin's Blosc filter) and prints what it finds as JSON:
root attributes, each data set's shape, dtype, chunks and filters, the labels, the pixels (fixed layout) or bytes
(encoded layout) of the rows asked for, and, with --hash, the content hash recomputed from the data exactly as
pack.rs defines it (64-bit FNV-1a over every row in order: u64le(byte count), bytes, i64le(label) when labeled).
When the file has `checksums` (encoded layout: CRC-32 of each row's bytes), every row is checked with Python's
zlib.crc32, an implementation independent of ours: "checksums" gives the algorithm (the data set's `checksum`
attribute), how many rows verified and which rows did not (the exit status stays 0: the caller judges).

    check_packed.py FILE [--rows 0,1,1999] [--hash]

Used by pipeline/tests/hdf5.rs, which compares every field with what our reader and writer say.
"""
import argparse
import json
import sys
import zlib

import h5py
import numpy as np

try:
    import hdf5plugin  # noqa: F401  registers the Blosc filter (32001) of `pack`'s default codec with h5py's HDF5
except ImportError:
    sys.exit("check_packed.py: needs hdf5plugin to read Blosc chunks (scripts/setup installs it into its venv)")

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1


def fnv1a64(h, data):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def plain(v):
    """h5py attribute values → JSON-able Python values."""
    if isinstance(v, np.ndarray):
        return [plain(x) for x in v.tolist()]
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def describe(ds):
    return {
        "shape": list(ds.shape),
        "dtype": str(ds.dtype) if ds.dtype.kind != "O" else "vlen " + str(h5py.check_vlen_dtype(ds.dtype)),
        "chunks": list(ds.chunks) if ds.chunks else None,
        "compression": ds.compression,
        "compression_opts": ds.compression_opts,
        # The whole pipeline as HDF5 stores it: [filter id, [cd_values]] in write order (Blosc's cd_values:
        # filter version, blosc version, type size, chunk bytes, level, shuffle, compressor: 2 = LZ4HC).
        "filters": [[f[0], list(f[2])] for f in map(ds.id.get_create_plist().get_filter,
                                                     range(ds.id.get_create_plist().get_nfilters()))],
        "fletcher32": bool(ds.fletcher32),
        "shuffle": bool(ds.shuffle),
        "attrs": {k: plain(v) for k, v in ds.attrs.items()},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--rows", default="", help="comma-separated row numbers whose data to print")
    ap.add_argument("--hash", action="store_true", help="recompute the content hash over all rows")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",") if r]
    with h5py.File(args.file, "r") as f:
        out = {
            "attrs": {k: plain(v) for k, v in f.attrs.items()},
            "datasets": {name: describe(f[name]) for name in f.keys()},
        }
        data = f["images"] if "images" in f else f["encoded"]
        labels = f["labels"][:] if "labels" in f else None
        out["labels"] = labels.tolist() if labels is not None else None
        out["source_index"] = f["source_index"][:].tolist() if "source_index" in f else None
        out["rows"] = {str(r): np.asarray(data[r]).reshape(-1).tolist() for r in rows}
        if args.hash:
            h = FNV_OFFSET
            for start in range(0, data.shape[0], 1024):
                block = data[start : start + 1024]
                for k, row in enumerate(block):
                    raw = np.asarray(row, dtype=np.uint8).tobytes()
                    h = fnv1a64(h, len(raw).to_bytes(8, "little"))
                    h = fnv1a64(h, raw)
                    if labels is not None:
                        h = fnv1a64(h, int(labels[start + k]).to_bytes(8, "little", signed=True))
            out["content_hash"] = f"{h:016x}"
        out["checksums"] = None
        if "checksums" in f:
            sums = f["checksums"][:]
            verified, mismatched = 0, []
            for start in range(0, data.shape[0], 1024):
                for k, row in enumerate(data[start : start + 1024]):
                    r = start + k
                    if r < len(sums) and zlib.crc32(np.asarray(row, dtype=np.uint8).tobytes()) == int(sums[r]):
                        verified += 1
                    else:
                        mismatched.append(r)
            algorithm = f["checksums"].attrs.get("checksum")
            out["checksums"] = {
                "algorithm": plain(algorithm) if algorithm is not None else None,
                "count": len(sums),
                "verified": verified,
                "mismatched": mismatched,
            }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
