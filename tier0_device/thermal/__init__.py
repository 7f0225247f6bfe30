"""Thermal- and power-aware serving on the device: sensors (thermal zones, RAPL, cpufreq, process CPU), energy
accounting per model version, the thermal policy with hysteresis, and the monitor that drives them periodically;
:mod:`~tier0_device.thermal.thermal_service` wires them into the node (its engine limits, status and metrics).

The policy's "threads" are shrunk as the engine's run slots — onnxruntime runs allowed at once — since a
session's intra-op threads are fixed when it is created.
"""
