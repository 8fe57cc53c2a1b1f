"""The shared text-to-image prior and what every job uses: loading, sampling, configs, run directories."""

from .errors import UserError
from .prior import Conditioning, Prior
from .sampling import initial_noise, sample

__all__ = ["Conditioning", "Prior", "UserError", "initial_noise", "sample"]
