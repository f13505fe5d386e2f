"""AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575): coefficients learned by minimising the
entropy of each task head's predictions on unlabeled test data (``objective=entropy``).

One class, four presets: layer-wise (the paper's headline), task-wise (one coefficient per expert), AdaMerging++
(over TIES-processed task vectors) and DOGE + AdaMerging (over DOGE-modified task vectors,
https://arxiv.org/abs/2501.01230). A ``transform`` is a first pass over the task vectors, run before learning.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.utils import instantiate

from adamerge.methods.learned import LearnedMethod
from adamerge.methods.registry import Needs, Run, register

PAPER = "https://arxiv.org/abs/2310.02575"


@dataclass
class AdaMerging(LearnedMethod):
    """Attributes (besides ``LearnedMethod``'s):
    transform: a partial pool -> pool (``_target_`` + ``_partial_: true``) applied to the task vectors before
        learning (TIES for AdaMerging++, DOGE's delta for DOGE + AdaMerging); null: the raw task vectors.
    """

    transform: dict | None = None

    def pool_for_learning(self, run: Run):
        return run.pool if self.transform is None else instantiate(self.transform)(run.pool)


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
