"""modelconsole.gpu: what the hardware says and allows.

devices.py reads devices (NVML, or a simulated backend for machines without
an NVIDIA GPU); budget.py turns a reading into what may still be placed on a
device.  The decisions that use them live in modelconsole.scheduler.memory.
"""
