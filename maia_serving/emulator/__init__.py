"""The emulated device: profiles, capacity, cost and clock. Imports no engine."""

from maia_serving.emulator.cost.layout import Parallel
from maia_serving.emulator.cost.model import StepCost, StepShape, step_cost
from maia_serving.emulator.device.clock import EmulatedClock, RequestTiming
from maia_serving.emulator.hardware import DeviceProfile, LinkProfile, UnknownProfileError, load_profile, profile_names
from maia_serving.emulator.memory import MemoryPlan, NotEnoughMemory, ServingConfig, plan_memory, require_fit
from maia_serving.emulator.model_shape import ModelShape, load_model_shape, shape_from_config

__all__ = [
    "DeviceProfile",
    "EmulatedClock",
    "LinkProfile",
    "MemoryPlan",
    "ModelShape",
    "NotEnoughMemory",
    "Parallel",
    "RequestTiming",
    "ServingConfig",
    "StepCost",
    "StepShape",
    "UnknownProfileError",
    "load_model_shape",
    "load_profile",
    "plan_memory",
    "profile_names",
    "require_fit",
    "shape_from_config",
    "step_cost",
]
