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

Memory: the NumPy views over the batch's C storage (state rows, outputs) each hold a reference to
the :class:`_Memory` that frees it, so the batch is deleted only when neither the :class:`MjBatch`
nor any view is left — a view never outlives its memory. ``close()`` ends the batch's calls (they
raise afterwards); its memory goes with the last view.
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
_MJTNUM = np.dtype(np.float64)  # mjtNum of the standard build (a single-precision build is refused)


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
        "mjb_nsim": (_I, [_P]),
        "mjb_nthread": (_I, [_P]),
        "mjb_persistent": (_I, [_P]),
        "mjb_error": (ctypes.c_char_p, [_P, _I]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _LIB = lib
    return lib


class _Memory:
    """Owns one ``mjBatch*``: ``mjb_deleteBatch`` when the last reference to it goes."""

    def __init__(self, lib: ctypes.CDLL, ptr: int):
        self.ptr = ptr
        weakref.finalize(self, lib.mjb_deleteBatch, ptr)

    def __reduce_ex__(self, protocol):
        raise TypeError("an MjBatch owns C memory and cannot be copied or pickled; make another")


class MjBatch:
    """``nsim`` simulations of ``model`` (the batch keeps its own copy), ``nthread`` threads.

    ``state`` is the live ``(nsim, nstate)`` float64 array of mjSTATE_INTEGRATION rows (qpos, qvel,
    act, warm start, ctrl, ...; ``mj_getState`` order): a write is the simulation's state at its
    next call. :meth:`component` views one part of it; :meth:`output` views a derived MjData field,
    copied out after every call on a simulation. Views keep the memory alive (module docstring).
    """

    def __init__(self, model: mujoco.MjModel, nsim: int, nthread: int):
        if model.qpos0.dtype != _MJTNUM:
            raise RuntimeError(f"env.engine=mujoco needs MuJoCo's float64 build (mjtNum is {model.qpos0.dtype} "
                               "here); use env.engine=gymnasium")
        if not (isinstance(nsim, int) and nsim >= 1 and isinstance(nthread, int) and 1 <= nthread <= nsim):
            raise ValueError(f"MjBatch needs nsim >= 1 and 1 <= nthread <= nsim; got nsim={nsim!r}, "
                             f"nthread={nthread!r}")
        lib = self._lib = _library()
        cfg = _Config()
        lib.mjb_defaultConfig(ctypes.byref(cfg))
        cfg.nthread, cfg.persistent = nthread, True
        err = ctypes.create_string_buffer(1000)
        ptr = lib.mjb_makeBatch(model._address, nsim, ctypes.byref(cfg), err, len(err))
        if not ptr:
            raise RuntimeError(f"mjb_makeBatch failed: {err.value.decode(errors='replace')}")
        self._memory: _Memory | None = _Memory(lib, ptr)
        self._ptr = ptr
        self.model, self.nsim = model, nsim
        # what the batch was made with, read back from it (a wrong _Config layout would show here)
        self.nthread = lib.mjb_nthread(ptr)
        if (lib.mjb_nsim(ptr), self.nthread, lib.mjb_persistent(ptr)) != (nsim, nthread, 1):
            raise RuntimeError(f"mjb_makeBatch made nsim={lib.mjb_nsim(ptr)}, nthread={self.nthread}, "
                               f"persistent={lib.mjb_persistent(ptr)}; asked for {nsim}, {nthread}, 1")
        self.nstate = lib.mjb_nstate(ptr)
        if self.nstate != mujoco.mj_stateSize(model, mujoco.mjtState.mjSTATE_INTEGRATION):
            raise RuntimeError(f"mjb_nstate={self.nstate} is not mj_stateSize(mjSTATE_INTEGRATION) of the model")
        self._state_addr = lib.mjb_state(ptr)
        self.state = self._array(self._state_addr, (nsim, self.nstate))
        self._outputs: dict[str, np.ndarray] = {}
        # MuJoCo's function run on each simulation after a step (Ant's cfrc_ext). mjb_apply calls
        # func(m, d, sim, arg); mj_rnePostConstraint(m, d) ignores the two trailing arguments,
        # which every C calling convention MuJoCo ships for passes in registers or caller-cleaned.
        self._rne_post = ctypes.cast(lib.mj_rnePostConstraint, _P)

    def _array(self, addr: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array over ``prod(shape)`` doubles at ``addr``, holding the batch's memory."""
        if not addr or addr % _MJTNUM.alignment:
            raise RuntimeError(f"MuJoCo returned an unusable address {addr!r} for a {shape} float64 array")
        buf = (ctypes.c_double * int(np.prod(shape))).from_address(addr)
        buf._memory = self._memory  # the view's base is buf: the memory lives while the view does
        return np.frombuffer(buf, dtype=_MJTNUM).reshape(shape)

    def _live(self) -> int:
        if self._memory is None:
            raise RuntimeError("this MjBatch was closed")
        return self._ptr

    def component(self, spec: mujoco.mjtState) -> np.ndarray:
        """Live ``(nsim, size)`` view of one state component (e.g. ``mjSTATE_QPOS``)."""
        size = _I()
        addr = self._lib.mjb_stateComponent(self._live(), int(spec), ctypes.byref(size))
        offset = (addr or 0) - self._state_addr
        start, stop = offset // _MJTNUM.itemsize, offset // _MJTNUM.itemsize + size.value
        if not addr or offset % _MJTNUM.itemsize or not 0 <= start <= stop <= self.nstate:
            raise ValueError(f"state component {spec!r} is not in the batch's mjSTATE_INTEGRATION rows")
        return self.state[:, start:stop]

    def output(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Read-only ``(nsim, *shape)`` view of the float64 MjData field ``name``."""
        if name in self._outputs:  # registered once: each registration copies out after every call
            return self._outputs[name]
        size, elem = _I(), _I()
        addr = self._lib.mjb_output(self._live(), name.encode(), ctypes.byref(size), ctypes.byref(elem))
        if not addr or elem.value != 8 or size.value != int(np.prod(shape)):
            raise ValueError(f"MjData field {name!r} cannot be bound as float64 {shape}")
        out = self._array(addr, (self.nsim, size.value)).reshape((self.nsim, *shape))
        out.flags.writeable = False
        self._outputs[name] = out
        return out

    def _ids(self, ids: np.ndarray | None) -> tuple[np.ndarray | None, int | None, int]:
        """``ids`` as a contiguous int32 array (kept by the caller during the C call), its address,
        its length. MuJoCo wants them sorted, unique and in range, and its error for them ends the
        process (mju_error), so they are checked here."""
        if ids is None:
            return None, None, 0
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int32)
        if len(ids) and (ids[0] < 0 or ids[-1] >= self.nsim or (np.diff(ids) <= 0).any()):
            raise IndexError(f"simulation ids {ids.tolist()} are not sorted, unique and in [0, {self.nsim})")
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
        self._check(self._lib.mjb_reset(self._live(), addr, n, None, stage), keep, "mjb_reset")

    def forward(self, ids: np.ndarray | None = None, stage: int = STAGE_ACC) -> None:
        """Compute the forward stages up to ``stage`` (default: ``mj_forward``); outputs refresh."""
        keep, addr, n = self._ids(ids)
        self._check(self._lib.mjb_forward(self._live(), addr, n, stage), keep, "mjb_forward")

    def step(self, nstep: int) -> None:
        """``nstep`` calls of ``mj_step`` on every simulation."""
        self._check(self._lib.mjb_step(self._live(), None, 0, nstep, STAGE_NONE), None, "mjb_step")

    def rne_post_constraint(self) -> None:
        """``mj_rnePostConstraint`` on every simulation's MjData as the last step left it, as
        Gymnasium's MujocoEnv runs after its frame_skip steps; then refresh the outputs (a
        forward call of no stage computes nothing and copies them out)."""
        self._check(self._lib.mjb_apply(self._live(), None, 0, self._rne_post, None, 0), None, "mjb_apply")
        self.forward(None, STAGE_NONE)

    def close(self) -> None:
        """No more calls; the memory is freed once no view of it is left."""
        self._memory = None
        self.state = None
        self._outputs.clear()
