"""AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575): coefficients learned by minimising the
entropy of each task head's predictions on unlabeled test data (``objective=entropy``).

One class, four presets: layer-wise (the paper's headline), task-wise (one coefficient per expert), AdaMerging++
(over TIES-processed task vectors) and DOGE + AdaMerging (over DOGE-modified task vectors,
https://arxiv.org/abs/2501.01230). A ``transform`` is a first pass over the task vectors, run before learning.
"""

from __future__ import annotations

from dataclasses import dataclass

from adamerge.methods.learned import LearnedMethod
from adamerge.methods.registry import Needs, register

PAPER = "https://arxiv.org/abs/2310.02575"


@dataclass
class AdaMerging(LearnedMethod):
    """AdaMerging's options are ``LearnedMethod``'s; its presets differ in ``granularity`` and ``transform``."""


register(
    "adamerging",
    kind="learned",
    description="Layer-wise AdaMerging: one coefficient per expert and tensor, by entropy minimisation",
    paper=PAPER,
    needs=Needs(calibration=True),
)(AdaMerging)
register(
    "adamerging_task",
    kind="learned",
    description="Task-wise AdaMerging: one coefficient per expert, by entropy minimisation",
    paper=PAPER,
    needs=Needs(calibration=True),
)(AdaMerging)
register(
    "adamerging_pp",
    kind="learned",
    description="AdaMerging++: layer-wise AdaMerging over TIES-processed task vectors (top 20%, elected signs)",
    paper=PAPER,
    needs=Needs(dense=True, calibration=True, first_pass="TIES trim and sign election of the task vectors"),
)(AdaMerging)
register(
    "doge_adamerging",
    kind="learned",
    description="DOGE + AdaMerging: layer-wise AdaMerging over task vectors modified by DOGE's data-free delta",
    paper="https://arxiv.org/abs/2501.01230",
    needs=Needs(dense=True, calibration=True, first_pass="DOGE's data-free delta"),
)(AdaMerging)
