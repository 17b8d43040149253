"""llmsparse: post-training sparsification for Hugging Face LLMs."""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .errors import LlmsparseError  # noqa: E402
from .masks import Pattern  # noqa: E402
from .models import load_model  # noqa: E402
from .moe import MoefyConfig, MoefyReport, moefy  # noqa: E402
from .moe_export import load_moefied, save_moefied  # noqa: E402
from .pruner import PruneReport, prune  # noqa: E402

__all__ = ["__version__", "prune", "PruneConfig", "PruneReport", "Pattern", "load_model", "LlmsparseError",
           "moefy", "MoefyConfig", "MoefyReport", "save_moefied", "load_moefied"]
