"""`python -m mlx_openelm.eval ...`: lm-eval's own command line with the `mlx-openelm` backend
registered and the local tasks (hellaswag_local) on the include path.

lm-eval 0.4.x finds backends only in its own source tree, so its `lm_eval` script cannot see ours;
this runs the same script after registering, e.g.
`python -m mlx_openelm.eval run --model mlx-openelm --model_args model=DIR --tasks hellaswag_local`.
"""

import sys

from ..tasks import TASKS_DIR
from .harness import require_lm_eval


def main() -> None:
    try:
        require_lm_eval()
    except ImportError as e:
        sys.exit(f"error: {e}")
    from lm_eval.__main__ import cli_evaluate

    from . import lm  # noqa: F401  (registers the backend)

    args = sys.argv[1:]
    names_tasks = any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in args)
    if names_tasks and not any(a.startswith("--include_path") for a in args):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
