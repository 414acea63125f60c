"""The emulator's GPU and data-center catalog.

Prices are USD/h for one GPU. The OpenAPI document gives only one example price (RTX 4090: 0.44
secure, 0.31 community, in the listGpuTypes example) and none for the A40 or the H100s. The figures
below are RunPod's public list prices as recalled from its 2025 pricing page (not verified:
there is no network here). Third-party summaries disagree by up to ~$0.40/h (e.g.
spheron.network, May 2026, quotes the H100 SXM at about $2.69/h secure but the PCIe at about $2.79/h).
They only have to be plausible for tests; users read live prices with `python -m infra.catalog`.
"""

from __future__ import annotations

# id -> (display name, memory GB, secure $/h, community $/h, max count secure, max count community, pool)
GPU_TYPES: dict[str, tuple] = {
    "NVIDIA A40": ("A40", 48, 0.40, 0.35, 8, 4, "AMPERE_48"),
    "NVIDIA RTX A6000": ("RTX A6000", 48, 0.49, 0.33, 8, 4, "AMPERE_48"),
    "NVIDIA GeForce RTX 4090": ("RTX 4090", 24, 0.44, 0.31, 8, 4, "ADA_24"),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 80, 2.69, 2.39, 8, 8, "HOPPER_141"),
    "NVIDIA H100 PCIe": ("H100 PCIe", 80, 2.39, 1.99, 8, 2, "ADA_80_PRO"),
    "NVIDIA H100 NVL": ("H100 NVL", 94, 2.79, 2.59, 8, 2, None),
}

# id -> (name, region, network volume types, global networking)
DATA_CENTERS: dict[str, tuple] = {
    "EU-RO-1": ("Europe Romania 1", "EUROPE", ["STANDARD"], True),
    "US-KS-2": ("US Kansas 2", "NORTH_AMERICA", ["STANDARD", "HIGH_PERFORMANCE"], True),
    "US-TX-3": ("US Texas 3", "NORTH_AMERICA", ["STANDARD"], False),
}

# Which GPU types each data center has (all of them, by default: tests narrow it with faults).
DEFAULT_STOCK = {dc: set(GPU_TYPES) for dc in DATA_CENTERS}

# Storage list prices, USD per GB per month (RunPod's published rates: container and pod volume
# $0.10 while running, pod volume $0.20 while stopped, network volume $0.07 standard).
DISK_RUNNING_GB_MONTH = 0.10
DISK_STOPPED_GB_MONTH = 0.20
NETWORK_VOLUME_GB_MONTH = {"STANDARD": 0.07, "HIGH_PERFORMANCE": 0.14}
HOURS_PER_MONTH = 730.0

# The real capacity message (400 carries no machine-readable code for it: see createPod).
CAPACITY_DETAIL = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
