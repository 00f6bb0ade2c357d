"""Local lm-eval tasks that need no download: the folder is passed to lm-eval as an include path."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
LOCAL_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
