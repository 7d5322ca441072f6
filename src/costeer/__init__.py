"""costeer: collaborative decoding-time personalization (CoSteer, arXiv 2507.04756).

A cloud model writes; a small device model that alone reads the user's private
context steers it token by token through its local delta.
"""

from ._version import __version__
from .context_cache import ContextCache
from .errors import UserError
from .fusion import SteeringParams, fuse_closed_form, fuse_ftrl_loop, local_delta, steering_coefficient
from .api import CloudConfig, CoSteer, Generation, GenerationRequest, Score
from .methods import METHODS
from .prompts import PAPER_SYSTEM_PROMPT, load_context
from .sampling import SamplingConfig

__all__ = [
    "CloudConfig",
    "CoSteer",
    "ContextCache",
    "Generation",
    "GenerationRequest",
    "METHODS",
    "PAPER_SYSTEM_PROMPT",
    "SamplingConfig",
    "Score",
    "SteeringParams",
    "UserError",
    "fuse_closed_form",
    "fuse_ftrl_loop",
    "load_context",
    "local_delta",
    "steering_coefficient",
]
