"""The CUDA sources as the run-time (NVRTC) loader sees them: one translation unit
made of every header of cuda/, each after the headers it includes. Checked on CPU,
so a header added to cuda/ but not to the loader fails here, not on a GPU machine
without nvcc."""

import re

from pagedserve.ops import loaders

INCLUDE = re.compile(r'^#include "(.+)"$', re.M)


def test_every_header_is_in_the_runtime_source_in_include_order():
    d = loaders.kernel_source_dir()
    on_disk = {p.name for p in d.glob("*.cuh")} - {"all_kernels.cuh"}
    assert set(loaders.KERNEL_HEADERS) == on_disk
    seen = []
    for name in loaders.KERNEL_HEADERS:
        for dep in INCLUDE.findall((d / name).read_text()):
            assert dep in seen, f"{name} includes {dep}, which comes later"
        seen.append(name)
    assert not INCLUDE.search(loaders.kernel_source())


def test_all_kernels_header_includes_every_kernel_header():
    d = loaders.kernel_source_dir()
    included = set(INCLUDE.findall((d / "all_kernels.cuh").read_text()))
    kernels = {n for n in loaders.KERNEL_HEADERS
               if re.search(r"__global__", (d / n).read_text())}
    assert kernels <= included
