"""Triton kernels and their launchers (installed as ``euphonium.kernels``).

Only kernels live here: no autograd, no models. Each module that defines kernels also lists the
variants to compile ahead of time in ``AOT_SPECS`` (see ``euphonium.kernels.aot``).
"""
