"""Test-only stand-in for triton (a 1 GB wheel): SGLang's EPLB modules import it at module level
for kernels these tests never run. Decorators return the function; any other attribute is an
inert placeholder. Put on the subprocess path only when no real triton is importable."""

import sys
import types

__version__ = "0.0.0+moeplace-test-shim"


def jit(fn=None, **_kw):
    return fn if fn is not None else (lambda f: f)


def autotune(*_a, **_k):
    return lambda f: f


def heuristics(*_a, **_k):
    return lambda f: f


class Config:
    def __init__(self, *_a, **_k):
        pass


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << (n - 1).bit_length()


class _Inert(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self.__name__}.{name}")

    def __call__(self, *a, **_k):
        return a[0] if a and callable(a[0]) else self


language = _Inert("triton.language")
sys.modules["triton.language"] = language
