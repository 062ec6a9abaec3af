"""Where the evaluation tasks live: the bundled task definitions, and lm-eval's own tasks.

The bundled tasks (`BUNDLED_TASKS_DIR`, package data: a `NAME.yaml` in lm-eval's task format
next to the JSONL it reads) are run by distill-eval (eval/tasks.py) and read as evaluation
data by `logitstore decontaminate` (logitstore.toolkit.eval_texts), so they live here, where
both may read them.

lm-eval's tasks are found without its full index (about a minute to build): `lm_eval_folders`
lists the folders under lm_eval/tasks/ whose YAML files mention the name (a second), and a
TaskManager indexes only those. lm_eval is imported inside the functions.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

BUNDLED_TASKS_DIR = Path(__file__).resolve().with_name("tasks")


def bundled_tasks() -> dict[str, Path]:
    """Task name -> its YAML definition, for every bundled task."""
    return {p.stem: p for p in sorted(BUNDLED_TASKS_DIR.glob("*.yaml"))}


def bundled_task_data(name: str) -> list[Path]:
    """The JSONL files the bundled task `name` reads (its YAML's `dataset_kwargs.data_files`,
    relative to the YAML's folder)."""
    definition = bundled_tasks()[name]
    config = yaml.safe_load(definition.read_text(encoding="utf-8"))
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return [definition.parent / str(v) for v in flat]


def lm_eval_root() -> Path:
    import lm_eval.tasks

    return Path(sys.modules["lm_eval.tasks"].__file__).parent


def lm_eval_folders(name: str) -> list[str]:
    """Folders under lm_eval/tasks/ holding a YAML file that mentions `name` as a whole
    word (a task, group or tag is always named in some YAML): [] when lm-eval has no such
    task."""
    pattern = re.compile(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])")
    found = set()
    for path in lm_eval_root().rglob("*.yaml"):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if pattern.search(text):
            found.add(str(path.parent))
    return sorted(found)


def lm_eval_tasks(name: str) -> dict[str, Any] | None:
    """{task name: lm-eval Task} of the lm-eval task or group `name` with its documents
    loaded (datasets reads them from the hub or its cache), or None when lm-eval has no
    task of that name. Loading errors (a dataset that cannot be had) propagate."""
    folders = lm_eval_folders(name)
    if not folders:
        return None
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False, include_path=folders)
    if name not in manager.all_tasks:
        return None
    return dict(manager.load([name])["tasks"])  # every leaf task: a group's members too
