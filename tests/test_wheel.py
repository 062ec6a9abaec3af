"""`pip install .` without the checkout: the wheel is built from a copy of the sources,
installed into a temporary venv, and used from a directory outside the checkout - package
data (FORMAT.md, models.yaml, the presets, the eval tasks) and a tiny `teacher-dump` by
alias then `logitstore verify`, through the venv's own entry-point scripts. An editable
install of the same copy must list the presets too (`logitstore.presets` maps configs/).

The temporary venv gets the dependencies (torch, transformers...) from this venv through a
`.pth` line naming its site-packages. The `.pth` files inside a directory added that way are
not processed, so this checkout's editable finder stays inactive: what is imported is the
installed wheel, which the test checks (`logitstore.__file__`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml names the packages, README and LICENSE its metadata.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "logitstore", "teacher_dump",
           "student_train", "eval", "student_export", "distill_serve", "configs")
PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))

# Run inside the installed venv, from outside the checkout: prints what it found as JSON.
CHECK_INSTALLED = """
import json, sys
from importlib import resources
from pathlib import Path
import logitstore, teacher_dump, student_train, eval as eval_pkg
from logitstore.toolkit.hf import resolve_model
from eval.tasks import resolve_tasks
from teacher_dump.config import resolve_config
from teacher_dump.default_data import alias_default_data
presets = sorted(p.name for p in resources.files("logitstore.presets").iterdir()
                 if p.name.endswith(".yaml"))
tasks = [r.source for r in resolve_tasks("local")]
print(json.dumps({
    "files": [m.__file__ for m in (logitstore, teacher_dump, student_train, eval_pkg)],
    "format_md": (resources.files("logitstore") / "FORMAT.md").read_text()[:40],
    "presets": presets,
    "preset_by_name": resolve_config("tiny-cpu", {"model": "m", "data": ["d"],
                                                  "out": "s"}).top_k,
    "med42": resolve_model("med42").path_or_id,
    "med42_data": alias_default_data("med42"),
    "tasks": tasks, "tasks_exist": all(Path(t).is_file() for t in tasks),
}))
"""


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LOGITSTORE_MODELS", "VIRTUAL_ENV")}
    return {**env, **extra}


def _venv_with_dependencies(root: Path) -> Path:
    """A venv without pip whose sys.path ends with this venv's site-packages."""
    _run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site.stdout.strip()) / "logitstore_test_deps.pth").write_text("\n".join(ours) + "\n")
    return python


def _pip_install(python: Path, *args) -> None:
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "--no-build-isolation", "--quiet", *args])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A copy of what the build reads: the build writes build/ and *.egg-info beside it."""
    root = tmp_path_factory.mktemp("wheel_src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, root / name)
    return root


@pytest.fixture(scope="module")
def wheel(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-index",
                  "--no-build-isolation", sources, "-w", out])
    # setuptools warns about data folders it cannot place in a package; there must be none.
    assert "Package would be ignored" not in build.stdout + build.stderr
    assert "SetuptoolsDeprecationWarning" not in build.stdout + build.stderr
    [built] = out.glob("logitstore-*.whl")
    return built


def test_wheel_holds_the_package_data_and_the_licence(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ["logitstore/FORMAT.md", "logitstore/toolkit/models.yaml",
                   "logitstore/toolkit/tasks/medmcq_mini.yaml",
                   "logitstore/toolkit/tasks/medmcq_mini.jsonl",
                   *(f"logitstore/presets/{p}" for p in PRESETS)]:
        assert needed in names, needed
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    from tiny_hf import corpus, make_tiny_llama, make_tokenizer

    venv = tmp_path / "venv"
    python = _venv_with_dependencies(venv)
    _pip_install(python, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    found = json.loads(_run([python, "-c", CHECK_INSTALLED], cwd=work, env=_clean_env()).stdout)
    assert all(f.startswith(str(venv)) for f in found["files"]), found["files"]
    assert found["format_md"].startswith("# The logitstore format")
    assert found["presets"] == PRESETS and found["preset_by_name"] > 0
    assert found["med42"] == "m42-health/Llama3-Med42-8B"
    assert found["med42_data"] == ["medalpaca/medical_meadow_medical_flashcards@train"]
    assert found["tasks_exist"] and all(t.startswith(str(venv)) for t in found["tasks"])

    # The card's command, by alias, with the alias's default data (no --data).
    model = make_tiny_llama(tmp_path / "tiny_teacher", make_tokenizer(tmp_path / "tok"))
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus()[:6]))
    aliases = tmp_path / "models.yaml"
    aliases.write_text(f"tiny:\n  hub_id: {model}\n  default_data: {data}\n")
    env = _clean_env(LOGITSTORE_MODELS=str(aliases), HF_HUB_OFFLINE="1")
    bin_dir = venv / "bin"
    dump = _run([bin_dir / "teacher-dump", "--model", "tiny", "--out", "store", "--device", "cpu",
                 "--top-k", "4", "--capture-kernel", "eager", "--no-progress"], cwd=work, env=env)
    assert "6 records -> 6 samples" in dump.stdout
    verify = _run([bin_dir / "logitstore", "verify", "store"], cwd=work, env=env)
    assert "ok" in verify.stdout.lower()  # and exit status 0 (_run)


def test_editable_install_lists_the_presets(sources, tmp_path):
    python = _venv_with_dependencies(tmp_path / "venv")
    _pip_install(python, "--editable", sources)
    code = ("from importlib import resources; import json, logitstore; print(json.dumps("
            "[logitstore.__file__, sorted(p.name for p in resources.files('logitstore.presets')"
            ".iterdir() if p.name.endswith('.yaml'))]))")
    found = json.loads(_run([python, "-c", code], cwd=tmp_path, env=_clean_env()).stdout)
    assert found == [str(sources / "logitstore" / "__init__.py"), PRESETS]
