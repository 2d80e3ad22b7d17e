"""normlab: batch vs group vs layer normalization on one small CNN for CIFAR-10."""
from normlab.config import Config
from normlab.models import NORMS, Net, count_params, make_norm

__version__ = "0.1.0"
__all__ = ["Config", "NORMS", "Net", "count_params", "make_norm", "__version__"]
