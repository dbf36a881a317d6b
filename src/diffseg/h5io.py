"""HDF5 I/O shared by every stage: image ids, validated reading, row matching by id, split/resolution checks.

Every per-image file (dataset split, inference, uncertainty, CRF, baseline) holds an ``ids``
dataset of UTF-8 strings; rows of different files are matched by id, never by position.
Torch-free (h5py and numpy only), so every stage may import it.
"""

from __future__ import annotations

import os
from typing import Sequence

import h5py
import numpy as np

from diffseg.imageio import InputError

PER_FILE_KEYS = ("timesteps",)  # datasets with one value per file, not per image


def write_ids(node: h5py.Group, ids: Sequence[str]) -> h5py.Dataset:
    """Create ``ids`` (UTF-8 strings, one per image) in a file or group."""
    return node.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype("utf-8"))


def decode_ids(raw) -> list[str]:
    """Image ids as python str from an ``ids`` dataset or the array read from one (bytes or str)."""
    values = raw[()] if isinstance(raw, h5py.Dataset) else raw
    return [s.decode() if isinstance(s, bytes) else str(s) for s in values]


def open_h5(path: str | os.PathLike) -> h5py.File:
    """The file open for reading; a missing or unreadable file is an InputError naming it."""
    try:
        return h5py.File(path, "r")
    except (FileNotFoundError, OSError) as err:
        raise InputError(path, f"cannot open as HDF5 ({err})") from err


def require(node: h5py.Group, keys: Sequence[str], path, where: str = "") -> None:
    """InputError naming the file and the first of ``keys`` missing from ``node``."""
    for key in keys:
        if key not in node:
            raise InputError(path, f"missing dataset '{where}{key}'")


def read_h5(path: str | os.PathLike, keys: Sequence[str], group: str | None = None) -> dict:
    """ids (list of str), ``attrs`` and the named datasets of one HDF5 file (or one group of it), validated.

    Every dataset except those in PER_FILE_KEYS must have one row per id.
    """
    with open_h5(path) as fh:
        node = fh
        if group is not None:
            if group not in fh:
                raise InputError(path, f"no split '{group}' (groups: {sorted(fh)})")
            node = fh[group]
        where = f"{group}/" if group else ""
        require(node, ("ids", *keys), path, where)
        out = {"ids": decode_ids(node["ids"]), "attrs": dict(fh.attrs)}
        for key in keys:
            out[key] = node[key][()]
            if key not in PER_FILE_KEYS and len(out[key]) != len(out["ids"]):
                raise InputError(path, f"'{where}{key}' has {len(out[key])} rows but 'ids' has {len(out['ids'])}")
    return out


def labelled_rows(node: h5py.Group) -> np.ndarray:
    """Rows of a dataset split whose mask was read: ``has_mask`` (a ``prepare.labelled`` subset), else every row.

    The one test of "has a mask" of every stage that learns from masks or is scored against them.
    """
    if "has_mask" not in node:
        return np.arange(len(node["ids"]))
    return np.flatnonzero(node["has_mask"][()])


def read_labelled(path: str | os.PathLike, split: str, keys: Sequence[str] = ()) -> dict:
    """:func:`read_h5` of ``masks`` and ``keys`` of one dataset split, only its rows with a mask (labelled_rows).

    ``ids`` and every per-row dataset are of those rows; ``n_unlabelled`` counts the rows left out.
    """
    data = read_h5(path, ["masks", *keys], group=split)
    with open_h5(path) as fh:
        rows = labelled_rows(fh[split])
    n_all = len(data["ids"])
    data["n_unlabelled"] = n_all - len(rows)
    if len(rows) < n_all:
        data["ids"] = [data["ids"][r] for r in rows]
        for key in ("masks", *keys):
            if key not in PER_FILE_KEYS:
                data[key] = data[key][rows]
    return data


def match_rows(wanted: Sequence[str], file_ids: Sequence[str], path: str | os.PathLike, where: str = "") -> np.ndarray:
    """Row in ``file_ids`` of every wanted id; a missing id is an error naming the file and the id."""
    row_of = {image_id: row for row, image_id in enumerate(file_ids)}
    missing = [image_id for image_id in wanted if image_id not in row_of]
    if missing:
        raise InputError(path, f"image id {missing[0]} missing{where} ({len(missing)} of {len(wanted)} ids absent)")
    return np.array([row_of[image_id] for image_id in wanted], dtype=np.int64)


def check_resolution(masks: np.ndarray, truth: np.ndarray, path, key: str) -> None:
    """InputError naming ``path`` when the last two axes of ``masks`` (its dataset ``key``) differ from truth's."""
    if tuple(masks.shape[-2:]) != tuple(truth.shape[-2:]):
        raise InputError(path, f"'{key}' masks are {masks.shape[-1]}x{masks.shape[-2]} px but the ground "
                         f"truth is {truth.shape[-1]}x{truth.shape[-2]} px")


def check_split_attr(path, attrs: dict, expected: str) -> None:
    """Refuse an inference file made for another split (e.g. a test file passed as the val file)."""
    split = attrs.get("split")
    if split is not None and str(split) != expected:
        raise InputError(path, f"inference file is for split '{split}', expected '{expected}': "
                               f"pass the {expected} split's inference file")
