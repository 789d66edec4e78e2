"""MuJoCo's C batch API (``mjbatch.h``, MuJoCo >= 4.0) through ctypes: many MjData of one model,
stepped on MuJoCo's own thread pool with one call from Python for all of them.

Why not the Python ``mujoco.batch.Batch`` that wraps the same C API: it does not expose
``mjb_apply`` (run a C function on each simulation), which Ant needs — Gymnasium's ``MujocoEnv``
calls ``mj_rnePostConstraint`` after the step to fill ``cfrc_ext`` (Ant's contact forces), and
``mj_step`` does not. Everything else here is a thin wrapper, checked for bit-identity against
Gymnasium by tests/test_engines.py.

The batch is *persistent* (one MjData per simulation, as Gymnasium keeps one per env), so every
derived field — and ``mj_rnePostConstraint``'s result — is that simulation's own. ctypes releases
the GIL during each call; the pool's threads include the calling one.
"""

from __future__ import annotations

import ctypes
import glob
import os
import weakref

import mujoco
import numpy as np

_P, _I = ctypes.c_void_p, ctypes.c_int
STAGE_NONE, STAGE_POS, STAGE_ACC = (int(s) for s in (mujoco.mjtStage.mjSTAGE_NONE, mujoco.mjtStage.mjSTAGE_POS,
                                                     mujoco.mjtStage.mjSTAGE_ACC))


class _Config(ctypes.Structure):  # mjBatchConfig
    _fields_ = [("nthread", ctypes.c_int), ("persistent", ctypes.c_bool)]


_LIB: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    """The libmujoco the ``mujoco`` module loaded (same file: same process-wide library), with
    the signatures of the functions used here declared."""
    global _LIB
    if _LIB is not None:
        return _LIB
    where = os.path.dirname(mujoco.__file__)
    found = sorted(glob.glob(os.path.join(where, "libmujoco.so*")) + glob.glob(os.path.join(where, "libmujoco*.dylib"))
                   + glob.glob(os.path.join(where, "mujoco.dll")))
    if not found:
        raise RuntimeError(f"env.engine=mujoco: no MuJoCo shared library in {where}; use env.engine=gymnasium")
    lib = ctypes.CDLL(found[0])
    if not hasattr(lib, "mjb_makeBatch"):
        raise RuntimeError(f"env.engine=mujoco needs MuJoCo >= 4.0 (its batch API, mjbatch.h); this is "
                           f"mujoco {mujoco.__version__} — upgrade it, or use env.engine=gymnasium")
    sig = {
        "mjb_defaultConfig": (None, [ctypes.POINTER(_Config)]),
        "mjb_makeBatch": (_P, [_P, _I, ctypes.POINTER(_Config), ctypes.c_char_p, _I]),
        "mjb_deleteBatch": (None, [_P]),
        "mjb_nstate": (_I, [_P]),
        "mjb_state": (_P, [_P]),
        "mjb_stateComponent": (_P, [_P, _I, ctypes.POINTER(_I)]),
        "mjb_output": (_P, [_P, ctypes.c_char_p, ctypes.POINTER(_I), ctypes.POINTER(_I)]),
        "mjb_step": (_I, [_P, _P, _I, _I, _I]),
        "mjb_forward": (_I, [_P, _P, _I, _I]),
        "mjb_reset": (_I, [_P, _P, _I, _P, _I]),
        "mjb_apply": (_I, [_P, _P, _I, _P, _P, _I]),
        "mjb_status": (ctypes.POINTER(_I), [_P]),
        "mjb_error": (ctypes.c_char_p, [_P, _I]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _LIB = lib
    return lib


class MjBatch:
    """``nsim`` simulations of ``model`` (the batch keeps its own copy), ``nthread`` threads.

    ``state`` is the live ``(nsim, nstate)`` array of mjSTATE_INTEGRATION rows (qpos, qvel, act,
    warm start, ctrl, ...; ``mj_getState`` order): a write is the simulation's state at its next
    call. :meth:`component` views one part of it; :meth:`output` views a derived MjData field,
    copied out after every call on a simulation. The views live as long as this object: keep it.
    """

    def __init__(self, model: mujoco.MjModel, nsim: int, nthread: int):
        lib = self._lib = _library()
        cfg = _Config()
        lib.mjb_defaultConfig(ctypes.byref(cfg))
        cfg.nthread, cfg.persistent = nthread, True
        err = ctypes.create_string_buffer(1000)
        ptr = lib.mjb_makeBatch(model._address, nsim, ctypes.byref(cfg), err, len(err))
        if not ptr:
            raise RuntimeError(f"mjb_makeBatch failed: {err.value.decode(errors='replace')}")
        self._ptr = ptr
        self._free = weakref.finalize(self, lib.mjb_deleteBatch, ptr)
        self.model, self.nsim, self.nthread = model, nsim, nthread
        self.nstate = lib.mjb_nstate(ptr)
        self._state_addr = lib.mjb_state(ptr)
        self.state = self._array(self._state_addr, (nsim, self.nstate))
        # MuJoCo's function run on each simulation after a step (Ant's cfrc_ext). mjb_apply calls
        # func(m, d, sim, arg); mj_rnePostConstraint(m, d) ignores the two trailing arguments,
        # which every C calling convention MuJoCo ships for passes in registers or caller-cleaned.
        self._rne_post = ctypes.cast(lib.mj_rnePostConstraint, _P)

    @staticmethod
    def _array(addr: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_double)), shape=shape)

    def component(self, spec: mujoco.mjtState) -> np.ndarray:
        """Live ``(nsim, size)`` view of one state component (e.g. ``mjSTATE_QPOS``)."""
        size = _I()
        addr = self._lib.mjb_stateComponent(self._ptr, int(spec), ctypes.byref(size))
        start = (addr - self._state_addr) // 8
        return self.state[:, start:start + size.value]

    def output(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Read-only ``(nsim, *shape)`` view of the float64 MjData field ``name``."""
        size, elem = _I(), _I()
        addr = self._lib.mjb_output(self._ptr, name.encode(), ctypes.byref(size), ctypes.byref(elem))
        if not addr or elem.value != 8 or size.value != int(np.prod(shape)):
            raise ValueError(f"MjData field {name!r} cannot be bound as float64 {shape}")
        out = self._array(addr, (self.nsim, size.value)).reshape((self.nsim, *shape))
        out.flags.writeable = False
        return out

    def _ids(self, ids: np.ndarray | None) -> tuple[np.ndarray | None, int | None, int]:
        if ids is None:
            return None, None, 0
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        return ids, ids.ctypes.data, len(ids)

    def _check(self, nfail: int, ids: np.ndarray | None, what: str) -> None:
        if not nfail:
            return
        status = np.ctypeslib.as_array(self._lib.mjb_status(self._ptr), shape=(self.nsim,))
        sims = np.arange(self.nsim) if ids is None else ids
        failed = sims[status[sims] != 0]
        msg = self._lib.mjb_error(self._ptr, int(failed[0])).decode(errors="replace")
        raise RuntimeError(f"MuJoCo raised in {nfail} simulations of {what} ({failed[:5].tolist()}): {msg}")

    def reset(self, ids: np.ndarray | None = None, stage: int = STAGE_NONE) -> None:
        """``mj_resetData`` on the simulations ``ids`` (None: all), then compute up to ``stage``."""
        keep, addr, n = self._ids(ids)
        self._check(self._lib.mjb_reset(self._ptr, addr, n, None, stage), keep, "mjb_reset")

    def forward(self, ids: np.ndarray | None = None, stage: int = STAGE_ACC) -> None:
        """Compute the forward stages up to ``stage`` (default: ``mj_forward``); outputs refresh."""
        keep, addr, n = self._ids(ids)
        self._check(self._lib.mjb_forward(self._ptr, addr, n, stage), keep, "mjb_forward")

    def step(self, nstep: int) -> None:
        """``nstep`` calls of ``mj_step`` on every simulation."""
        self._check(self._lib.mjb_step(self._ptr, None, 0, nstep, STAGE_NONE), None, "mjb_step")

    def rne_post_constraint(self) -> None:
        """``mj_rnePostConstraint`` on every simulation's MjData as the last step left it, as
        Gymnasium's MujocoEnv runs after its frame_skip steps; then refresh the outputs (a
        forward call of no stage computes nothing and copies them out)."""
        self._check(self._lib.mjb_apply(self._ptr, None, 0, self._rne_post, None, 0), None, "mjb_apply")
        self.forward(None, STAGE_NONE)

    def close(self) -> None:
        self._free()
