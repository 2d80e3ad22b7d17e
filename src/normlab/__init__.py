"""normlab: batch vs group vs layer normalization on one small CNN for CIFAR-10."""
from normlab.config import Config
from normlab.device import Runtime
from normlab.models import Net, count_params
from normlab.norms import NORMS, make_norm

__version__ = "0.1.0"
__all__ = ["Config", "NORMS", "Net", "Runtime", "count_params", "make_norm", "__version__"]
