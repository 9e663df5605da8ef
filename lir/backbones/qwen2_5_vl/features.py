"""Per-example cache of the frozen vision tower's output (merged visual tokens).

LIVR and direct SFT keep the vision tower and merger frozen (LIVR appendix, training
details), so its output for an example is the same in every epoch and every stage.
:class:`VisionFeatureCache` computes it once per example (one tower call on that example's
images) and keeps it, on disk or in host memory, instead of holding every example's raw patches (three 1288x728 images are 14,352 x
1,176 float32 patches = 68 MB; their 3,588 bf16 merged tokens of the 3B model are 15 MB).

Entries are keyed by the example id, its image files (path, size, mtime) and a fingerprint
of the tower (config, processor settings and every vision weight), so a cache directory can
be shared between runs without serving stale features. On disk an entry is
``DIR/<fingerprint>/<key>.npz`` holding ``features`` [T, D] and ``grid`` int64[M, 3].
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lir.backbones.qwen2_5_vl.processor import ProcessorConfig, vision_layout
from lir.backbones.qwen2_5_vl.vision import VisionTower

Loader = Callable[[], tuple[np.ndarray, np.ndarray]]


def vision_fingerprint(visual: VisionTower, pcfg: ProcessorConfig) -> str:
    """Hex digest (32 chars) of the tower config, the processor config and every vision
    parameter (path, dtype, shape, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(visual.cfg).encode())
    h.update(repr(pcfg).encode())
    for path, var in nnx.to_flat_state(nnx.state(visual, nnx.Param)):
        arr = np.asarray(var[...])
        h.update(f"{'/'.join(map(str, path))}:{arr.dtype}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def example_key(example_id: str, image_paths: Sequence[str | os.PathLike] = ()) -> str:
    """Cache key of one example: its id and each image file's path, size and mtime."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(example_id).encode())
    for p in image_paths:
        st = os.stat(p)
        h.update(f"\0{os.fspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


class VisionFeatureCache:
    """The frozen tower's merged visual tokens of each example, computed once.

    Args:
      visual: the (frozen) :class:`VisionTower`; its parameter dtype is the compute dtype.
      pcfg: processor settings (part of the fingerprint).
      directory: cache root on disk, or None to keep the entries in host memory.
      pad_multiple: pad each call's patches to a multiple of this, so few shapes compile.

    ``calls`` counts tower invocations (one per computed example).
    """

    def __init__(
        self,
        visual: VisionTower,
        pcfg: ProcessorConfig,
        directory: str | os.PathLike | None = None,
        *,
        pad_multiple: int = 256,
        fingerprint: str | None = None,
    ):
        if pad_multiple % visual.cfg.merge_unit:
            raise ValueError(
                f"pad_multiple={pad_multiple} must be a multiple of the merge unit "
                f"{visual.cfg.merge_unit}"
            )
        self.visual = visual
        self.pad_multiple = pad_multiple
        self.fingerprint = fingerprint or vision_fingerprint(visual, pcfg)
        self.directory = (
            pathlib.Path(directory) / self.fingerprint if directory is not None else None
        )
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._run = nnx.jit(lambda m, p, layout: m(p, layout))
        self.calls = 0

    def compute(self, patches: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """One tower call: float32 patches [N, patch_dim] of some images with ``grid`` int[M,
        3] -> their merged tokens [N / 4, D] (NumPy, the tower's dtype), image order."""
        n = patches.shape[0]
        pad = -(-max(n, 1) // self.pad_multiple) * self.pad_multiple
        dtype = self.visual.patch_embed.kernel[...].dtype
        padded = np.zeros((pad, patches.shape[1]), np.float32)
        padded[:n] = patches
        layout = vision_layout(grid, self.visual.cfg, pad).arrays()
        out = self._run(self.visual, jnp.asarray(padded, dtype), layout)
        self.calls += 1
        return np.asarray(out[: n // self.visual.cfg.merge_unit])

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.npz"

    def _store(self, key: str, feats: np.ndarray, grid: np.ndarray) -> None:
        if self.directory is None:
            self._memory[key] = (feats, grid)
            return
        bf16 = feats.dtype == ml_dtypes.bfloat16
        buf = io.BytesIO()
        # NumPy files have no bfloat16: store its bits as uint16 and the dtype by name
        np.savez(
            buf,
            features=feats.view(np.uint16) if bf16 else feats,
            dtype=np.asarray("bfloat16" if bf16 else str(feats.dtype)),
            grid=np.asarray(grid, np.int64),
        )
        tmp = self._path(key).with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(self._path(key))

    def has(self, key: str) -> bool:
        return key in self._memory or (self.directory is not None and self._path(key).is_file())

    def ensure(self, key: str, load: Loader) -> np.ndarray:
        """Compute and store the entry of ``key`` unless present; ``load() -> (patches, grid)``
        is called only then. Returns the entry's grid int64[M, 3]."""
        if key in self._memory:
            return self._memory[key][1]
        if self.directory is not None and self._path(key).is_file():
            with np.load(self._path(key)) as f:
                return f["grid"]
        patches, grid = load()
        grid = np.asarray(grid, np.int64).reshape(-1, 3)
        self._store(key, self.compute(patches, grid), grid)
        return grid

    def get(self, key: str, load: Loader | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features [T, D], grid int64[M, 3]) of ``key``, computed first (through ``load``)
        if absent."""
        if not self.has(key):
            if load is None:
                raise KeyError(f"vision feature cache has no entry {key!r} and no loader")
            self.ensure(key, load)
        if key in self._memory:
            return self._memory[key]
        with np.load(self._path(key)) as f:
            feats, dtype, grid = f["features"], str(f["dtype"]), f["grid"]
        if dtype == "bfloat16":
            feats = feats.view(ml_dtypes.bfloat16)
        return feats, grid
