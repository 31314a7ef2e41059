"""The layout planner: which ring x Ulysses (x data) layout runs an attention call fastest on a machine,
from a cost model (cost.py) over hardware profiles (hardware.py, profiles.py)."""

from .cost import IMPLEMENTATIONS, Plan, placement_mesh, plan
from .hardware import HardwareProfile, Link
from .profiles import BUILTIN, PROFILE_NAMES, default_hardware, get_profile

__all__ = ["BUILTIN", "IMPLEMENTATIONS", "PROFILE_NAMES", "HardwareProfile", "Link", "Plan",
           "default_hardware", "get_profile", "placement_mesh", "plan"]
