"""The layout planner: which ring x Ulysses (x data) layout runs an attention call fastest on a machine,
from a cost model (cost.py) over hardware profiles (hardware.py, profiles.py)."""

from .cost import Plan, plan
from .hardware import HardwareProfile, Link
from .profiles import BUILTIN, PROFILE_NAMES, get_profile

__all__ = ["BUILTIN", "PROFILE_NAMES", "HardwareProfile", "Link", "Plan", "get_profile", "plan"]
