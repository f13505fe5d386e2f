"""A run's output keeps what a user can act on: Lightning's product tips and its internal deprecations are dropped."""

import logging
import warnings

from adamerge.engine.train import expected_lightning_warnings


def test_lightning_cloud_tips_are_dropped_and_other_messages_kept(caplog):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_lightning_pytree_deprecation_is_silenced_in_runs():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with expected_lightning_warnings():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", stacklevel=1)
            warnings.warn("a warning a user should see", stacklevel=1)
    assert [str(w.message) for w in seen] == ["a warning a user should see"]
