"""The pools a run trains on: a built-in synthetic task, or general/target/eval example files."""

from __future__ import annotations

from drpt_ray.config import DataSpec
from drpt_ray.data.examples import TaskSplits, load_examples
from drpt_ray.data.synthetic import arithmetic_task, scarce_target_task


def load_task(spec: DataSpec) -> TaskSplits:
    """Build the general, target and eval pools that `spec` describes.

    With `spec.task` "scarce_target" or "arithmetic" the built-in synthetic task is generated
    from the `n_*` and `seed` fields (and `p_clean` for scarce_target) and the paths are ignored.
    With `spec.task is None` the pools are read from `general_path`, `target_path` and
    `eval_path`; when `eval_path` is None the target pool doubles as the eval pool, so the
    reported "held-out" loss is then a training-set loss on the target pool.

    Args:
        spec: The data section of a run config.

    Returns:
        The three pools.

    Raises:
        ValueError: A file cannot be loaded (see `load_examples`).
    """
    if spec.task == "scarce_target":
        return scarce_target_task(
            n_general=spec.n_general, n_target=spec.n_target, n_eval=spec.n_eval, p_clean=spec.p_clean, seed=spec.seed
        )
    if spec.task == "arithmetic":
        return arithmetic_task(n_general=spec.n_general, n_target=spec.n_target, n_eval=spec.n_eval, seed=spec.seed)
    # DataSpec's validator guarantees both paths when task is None.
    keys = {"prompt_key": spec.prompt_key, "response_key": spec.response_key}
    general = load_examples(spec.general_path, **keys)
    target = load_examples(spec.target_path, **keys)
    eval_ = load_examples(spec.eval_path, **keys) if spec.eval_path else list(target)
    return TaskSplits(general=general, target=target, eval=eval_)
