"""Former name of the plan inspector, now :mod:`ringattn.inspect`; kept so that existing imports work."""

from .inspect import *  # noqa: F401,F403
from .inspect import __all__  # noqa: F401
