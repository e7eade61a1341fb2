"""CPU-feature names shared by the kit and the hardware probe, and the portable build's CMake flags."""

from __future__ import annotations

# llama_print_system_info() names -> /proc/cpuinfo flags. A feature it reports as 1 was compiled
# in unconditionally, so the CPU running the build must have it (unless the build dispatches).
SYSTEM_INFO_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
    "NEON": "asimd",
    "SVE": "sve",
    "DOTPROD": "asimddp",
    "MATMUL_INT8": "i8mm",
}
# GGML_NATIVE=OFF and every x86/Arm CPU variant as a loadable backend, runtime-dispatched; the variants
# go beside libllama (CMAKE_INSTALL_BINDIR) where model.py loads them.
PORTABLE_CMAKE = (
    "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
)
PORTABLE_FIX = (
    f'CMAKE_ARGS="-DLLAVA_BUILD=OFF {PORTABLE_CMAKE}" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python==0.3.36  # or install a kit built with the portable baseline"
)
