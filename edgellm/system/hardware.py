"""What this machine offers: CPU, RAM, GPUs and what this llama.cpp build can use (``edgellm doctor``).

``EDGELLM_GPU_MEMORY`` and ``EDGELLM_RAM`` (or the matching settings) state the free memory to plan
for instead of probing it: to plan for a machine you are not on, to leave room for other work,
or to test the planner on a machine without a GPU (the GPU is then marked as assumed).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    name: str
    backend: str
    total: int
    free: int
    assumed: bool = False  # stated by EDGELLM_GPU_MEMORY, not probed
    device: str = ""  # ggml's device name (CUDA0, RPC0[host:port], ...), as llama.cpp logs it


@dataclass(frozen=True)
class Hardware:
    cpu: str
    physical_cores: int
    logical_cpus: int
    ram_total: int
    ram_available: int
    gpus: tuple[GPU, ...]
    gpu_offload: bool  # this llama-cpp-python build can offload to a GPU
    backends: tuple[str, ...]
    system_info: str
    notes: tuple[str, ...] = field(default=())

    @property
    def gpu_free(self) -> int:
        return sum(g.free for g in self.gpus)


def physical_cores() -> int:
    """Cores llama.cpp should use by default: physical ones, since SMT siblings slow matmuls."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return max(os.cpu_count() or 1, 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
            )
        except OSError:
            return len(cpus)
    return max(len(cores), 1)


def _meminfo() -> tuple[int, int]:
    try:
        text = open("/proc/meminfo", encoding="ascii").read()
        values = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}
        return values["MemTotal"], values.get("MemAvailable", values.get("MemFree", 0))
    except (OSError, KeyError):
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total // 2
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> list[GPU]:
    """NVIDIA GPUs the driver sees, whatever this llama.cpp build can use."""
    out = _run("nvidia-smi", "--query-gpu=name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits")
    gpus = []
    for line in out.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
            gpus.append(GPU(parts[0], "sm_" + parts[3].replace(".", ""), int(parts[1]) << 20, int(parts[2]) << 20))
    return gpus


def _run(*argv: str) -> str:
    exe = shutil.which(argv[0])
    if not exe:
        return ""
    try:
        return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


#: what `make chat GPU=NAME` needs installed first
BUILD_NEEDS = {
    "cuda": "the CUDA toolkit",
    "metal": "Xcode's command line tools",
    "vulkan": "glslc, libvulkan-dev and spirv-headers (or the Vulkan SDK)",
    "cpu": "a C/C++ compiler",
}


def build_backend() -> str:
    """The llama.cpp backend for this machine, as ``make chat GPU=auto`` picks it: a device decides,
    never an installed toolkit (cuda: nvidia-smi lists a GPU; metal: Apple silicon; vulkan:
    vulkaninfo lists a GPU, not a CPU device such as Mesa's llvmpipe; else cpu)."""
    if _nvidia_smi():
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "metal"
    summary = _run("vulkaninfo", "--summary")
    if re.search(r"deviceType\s*=\s*PHYSICAL_DEVICE_TYPE_(DISCRETE|INTEGRATED|VIRTUAL)_GPU", summary):
        return "vulkan"
    return "cpu"


def build_of(backends: tuple[str, ...]) -> str:
    """The backend this llama.cpp was built for, from the device registries it has."""
    names = {b.lower() for b in backends}
    return next((b for b in ("cuda", "metal", "vulkan") if b in names), "cpu")


def probe(gpu_memory: int | None = None, ram: int | None = None, rpc: tuple[str, ...] = ()) -> Hardware:
    """Look at the machine (and the devices of any RPC workers, which count as GPUs); never raises
    on a machine without a GPU."""
    from edgellm.system import ggml
    from edgellm.system.devices import devices

    if rpc:
        from edgellm.system.rpc import connect

        connect(rpc)
    found = devices()
    gpus = [GPU(d.description or d.name, d.backend, d.total, d.free, device=d.name)
            for d in found if d.kind in ("gpu", "igpu")]
    offload = ggml.supports_gpu_offload()
    notes = []
    wanted, built = build_backend(), build_of(tuple(d.backend for d in found))
    if wanted not in ("cpu", built):
        notes.append(f"this machine has a {wanted.upper()} GPU but llama.cpp was built for {built.upper()}: "
                     f"`make chat GPU={wanted}` in edgellm's folder rebuilds it (needs {BUILD_NEEDS[wanted]})")
    elif not gpus:
        notes.append("no GPU found: running on the CPU only (`make chat GPU=cuda|metal|vulkan` builds for one)")
    if gpu_memory is not None and gpus:  # plan for less than the real GPU has free, on the real device
        gpus = [replace(gpus[0], free=gpu_memory)] + [replace(g, free=0) for g in gpus[1:]]
    elif gpu_memory is not None:
        gpus = [GPU("assumed GPU (EDGELLM_GPU_MEMORY)", "assumed", gpu_memory, gpu_memory, assumed=True)]
    ram_total, ram_available = _meminfo()
    if ram is not None:
        ram_available = ram
    return Hardware(
        cpu=_cpu_name(),
        physical_cores=physical_cores(),
        logical_cpus=os.cpu_count() or 1,
        ram_total=ram_total,
        ram_available=ram_available,
        gpus=tuple(gpus),
        gpu_offload=offload or gpu_memory is not None,
        backends=tuple(dict.fromkeys(d.backend for d in found)),
        system_info=ggml.system_info(),
        notes=tuple(notes),
    )


def cuda_architectures() -> str:
    """The visible NVIDIA GPUs' architectures as CMAKE_CUDA_ARCHITECTURES takes them (``90``, ``86;89``)."""
    return ";".join(sorted({g.backend.removeprefix("sm_") for g in _nvidia_smi()}))


if __name__ == "__main__":  # the Makefile's GPU=auto, and the CUDA architectures it builds for
    import sys

    print(cuda_architectures() if sys.argv[1:] == ["cuda-arch"] else build_backend())
