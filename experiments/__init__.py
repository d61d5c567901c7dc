"""The command-line programs, run from the repository root: `python -m experiments.<name>`.

On a host without a TPU or GPU device file (`malloc.has_accelerator`), JAX is told to use
the CPU (`JAX_PLATFORMS=cpu`, unless set) before any program imports it: an installed
accelerator plugin such as libtpu (the `[tpu]` extra) then neither probes for its device,
printing warnings, nor takes its lock file.
"""
import os

from experiments.malloc import has_accelerator

if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"
