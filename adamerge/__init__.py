"""adamerge: learn model-merging coefficients (AdaMerging, Expert Merging, DOGE) over Hugging Face experts."""

from adamerge.core.merged import MergedModel
from adamerge.core.merged_base import two_stage_backward
from adamerge.core.pool import ExpertPool, load_pool, make_pool

__all__ = ["ExpertPool", "MergedModel", "load_pool", "make_pool", "two_stage_backward"]
__version__ = "0.1.0"
