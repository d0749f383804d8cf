"""fbfast: fused rollouts of feedback MLPs (``y_t = W_L act(... act(W_1 [u_t; x_t] + b_1) ...) + b_L``).

`rollout` runs all T steps, forward and backward, in one compiled operator where one is built
(`backends()` says), else in pure PyTorch. docs/spec.md gives the exact maths.
"""

from .dispatch import BackendStatus, backends
from .functional import rollout
from .modules import FeedbackMLP, from_module
from .options import cpu_path_calibration, cuda_graph_stats, get_kernel_options, kernel_options, set_kernel_options
from .reference import rollout_reference

__version__ = "0.1.0"
__all__ = ["rollout", "rollout_reference", "FeedbackMLP", "from_module", "backends", "BackendStatus",
           "set_kernel_options", "get_kernel_options", "kernel_options", "cpu_path_calibration",
           "cuda_graph_stats"]
