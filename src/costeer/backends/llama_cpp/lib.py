"""Loading llama-cpp-python once: its log silenced, its backend started, ggml's AMX
weight buffers removed (a crash on Sapphire Rapids CPUs); the default thread count."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ...errors import UserError


def load_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError("llama-cpp-python is not installed: pip install llama-cpp-python") from exc
    _init_once(llama_cpp)
    return llama_cpp


_initialized = False
_log_callback = None  # kept referenced so ctypes does not free it


def _init_once(llama_cpp) -> None:
    global _initialized, _log_callback
    if _initialized:
        return
    if not os.environ.get("COSTEER_LLAMA_LOGS"):
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    if os.environ.get("COSTEER_ALLOW_AMX") != "1":
        _drop_amx_buffer_type(llama_cpp)
    _initialized = True


def _drop_amx_buffer_type(llama_cpp) -> None:
    """Remove ggml's AMX weight buffer from the CPU's extra buffer types.

    On Sapphire Rapids CPUs ggml stores Q4_K weights in AMX buffers, and decoding
    then crashes in ggml_backend_amx_mul_mat (llama.cpp issue #20824, open). Turning
    all extra buffers off (use_extra_bufts=False) avoids it but also drops the
    CPU_REPACK layouts, which measured 2.2x slower here. So we edit the
    NULL-terminated list ggml hands to llama.cpp, keeping CPU_REPACK.
    """
    try:
        libdir = Path(llama_cpp.__file__).parent / "lib"
        ggml = ctypes.CDLL(str(libdir / "libggml.so"))
        base = ctypes.CDLL(str(libdir / "libggml-base.so"))
    except OSError:
        return  # a build without separate ggml libraries: nothing to patch
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.restype, ggml.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype, base.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    base.ggml_backend_reg_get_proc_address.restype = vp
    base.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype, base.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    cpu_device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu_device:
        return
    registry = base.ggml_backend_dev_backend_reg(cpu_device)
    address = base.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return
    buffers = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(address)(cpu_device)
    if not buffers:
        return
    kept, i = [], 0
    while buffers[i]:
        if base.ggml_backend_buft_name(buffers[i]) != b"AMX":
            kept.append(buffers[i])
        i += 1
    for j in range(i):
        buffers[j] = kept[j] if j < len(kept) else None


def default_threads() -> int:
    configured = os.environ.get("COSTEER_THREADS")
    if configured:
        return max(1, int(configured))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
