"""logitstore.toolkit.options: one table per tool -> its flags, config object, YAML section
and config differences; `--config` by path or by bundled preset name."""

from __future__ import annotations

import dataclasses
import sys

import click
import pytest
from click.testing import CliRunner

from logitstore.toolkit import options
from logitstore.toolkit.options import (Field, at_least, click_options, config_class,
                                        config_differences, find_preset, make_config,
                                        resolve_fields, yaml_only_note)

TABLE = {
    "name": Field("optional_str", None, help="A name."),
    "size": Field("int", 4, at_least(1), help="A size."),
    "mode": Field("str", "fast", choices=("fast", "slow"), help="A mode."),
    "layers": Field("list_int", [], help="Layers."),
    "files": Field("list_str", [], help="Files."),
    "weights": Field("weights", {}, help="Weights."),
    "split_long": Field("bool", False, flag_names="--split-long/--truncate-long",
                        help="Split."),
    "dedup": Field("bool", True, help="Dedup."),
    "resume": Field("optional_str", None, bare_value="latest", resumable=True,
                    help="Resume."),
    "secret": Field("str", "x", yaml_only="a mapping too deep for one flag"),
}


@click.command(name="tool")
@click.option("--config", help="Preset." + yaml_only_note(TABLE, "tool"))
@click_options(TABLE)
def tool(config, **flags):
    click.echo(repr(sorted((k, v) for k, v in flags.items() if v not in (None, ()))))


def _flags(*args: str) -> dict:
    return tool.make_context("tool", list(args)).params


def test_click_options_follow_the_table():
    assert [p.name for p in tool.params][1:] == [k for k in TABLE if k != "secret"]
    help_text = CliRunner().invoke(tool, ["--help"], terminal_width=200).output
    for shown in ("--mode [fast|slow]", "A mode. [default: fast]", "--size N",
                  "--layers I,J", "--weights NAME:W,...", "--split-long / --truncate-long",
                  "Split. [default: --truncate-long]", "--dedup / --no-dedup",
                  "[default: --dedup]", "Repeat the flag or comma-separate",
                  "Only in its `tool:` section: secret (a mapping too deep for one flag)"):
        assert shown in help_text, shown
    assert "--secret" not in help_text
    # Values stay text (None = not given) for resolve_fields to coerce and check.
    params = _flags("--size", "x", "--truncate-long", "--files", "a,b", "--files", "c")
    assert params["size"] == "x" and params["split_long"] is False
    assert params["files"] == ("a,b", "c") and params["dedup"] is None
    assert _flags("--resume", "--size", "2")["resume"] == "latest"
    assert _flags("--resume", "ckpt-5")["resume"] == "ckpt-5"
    assert _flags()["resume"] is None


def test_resolve_fields_reports_every_problem(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("tool:\n  size: 0\n  mode: slow\n  layers: [-1, -1]\n  sise: 3\n"
                      "  weights: a:1,b\n")
    values, origin, problems = resolve_fields(TABLE, "tool", preset,
                                              {"mode": "medium", "files": ["a,b", "c"],
                                               "split-long": "yes"})
    assert values["files"] == ["a", "b", "c"] and values["split_long"] is True
    assert values["weights"] == {"a": 1.0, "b": 1.0}
    assert origin["files"] == "command line" and origin["weights"] == str(preset)
    assert problems == [
        f"layers ({preset}): lists a layer twice: [-1, -1]",
        f"{preset}: unknown setting 'sise' (did you mean 'size'?)",
        f"size ({preset}): must be >= 1, got 0",
        "mode (command line): must be one of fast, slow, got 'medium'"]
    # Defaults are copies: a tool may change its resolved lists in place.
    resolve_fields(TABLE, "tool", None, {})[0]["layers"].append(3)
    assert TABLE["layers"].default == []


def test_config_class_is_a_frozen_dataclass_of_the_table():
    cls = config_class("ToolConfig", TABLE, module=__name__, doc="A tool's config.",
                       methods={"big": property(lambda self: self.size > 8)})
    values, _, problems = resolve_fields(TABLE, "tool", None, {"layers": "-1,-4", "size": "9"})
    assert not problems
    cfg = make_config(cls, values)
    assert cfg.layers == (-1, -4) and cfg.files == () and cfg.big and cfg.secret == "x"
    assert cfg.as_dict()["layers"] == [-1, -4] and list(cfg.as_dict()) == list(TABLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.size = 3
    assert dataclasses.replace(cfg, size=2).size == 2 and not dataclasses.replace(cfg, size=2).big
    assert cls.__module__ == __name__ and cls.__doc__ == "A tool's config."


def test_config_differences():
    cls = config_class("ToolConfig", TABLE, module=__name__, doc="")
    values, _, _ = resolve_fields(TABLE, "tool", None, {"layers": "-1", "size": "5"})
    cfg = make_config(cls, values)
    saved = {**cfg.as_dict(), "resume": "latest"}  # resumable: never a difference
    assert config_differences(saved, cfg, TABLE) == []
    assert config_differences(saved, cfg.as_dict(), TABLE) == []
    saved.update(size=4, layers=(-1,), files=None)  # a tuple/None equal the list/[] now held
    del saved["mode"]  # a setting the saved config predates is not a difference
    assert config_differences(saved, cfg, TABLE, saved_as="store") == [
        "size: store has 4, now 5"]
    saved["layers"] = [-2]
    assert config_differences(saved, cfg, TABLE, saved_as="run") == [
        "size: run has 4, now 5", "layers: run has [-2], now [-1]"]


def test_a_setting_a_saved_config_predates_compares_as_its_absent_value():
    # Each new setting declares what configs saved before it did; a saved config lacking the
    # key holds that value: a difference like any other, with the flag that continues as saved.
    table = {"size": Field("int", 4, absent=3), "mode": TABLE["mode"],
             "dedup": Field("bool", True, absent=False),
             "split_long": dataclasses.replace(TABLE["split_long"], absent=True),
             "layers": Field("list_int", [-1], absent=[]),
             "secret": dataclasses.replace(TABLE["secret"], absent="old")}
    cls = config_class("ToolConfig", table, module=__name__, doc="")
    values, _, _ = resolve_fields(table, "tool", None, {"size": "3"})
    cfg = make_config(cls, values)
    assert config_differences({}, cfg, table, saved_as="run") == [
        "dedup: run has False, now True (run saved before the setting existed; --no-dedup "
        "continues as saved)",
        "split_long: run has True, now False (run saved before the setting existed; "
        "--split-long continues as saved)",
        "layers: run has [], now [-1] (run saved before the setting existed; --layers '' "
        "continues as saved)",
        "secret: run has 'old', now 'x' (run saved before the setting existed; `secret: "
        "'old'` in the config continues as saved)"]  # size: absent 3 = now; mode: no absent
    saved = {"dedup": True, "split_long": False, "layers": [-1], "secret": "x"}
    assert config_differences(saved, cfg, table) == []  # saved keys: compared as saved
    assert config_differences({**saved, "size": 5}, cfg, table) == ["size: saved has 5, now 3"]


def test_config_accepts_a_bundled_preset_name(tmp_path, monkeypatch):
    path, problems = find_preset("tiny-cpu")  # the checkout's configs/ or logitstore.presets
    assert not problems and path.name == "tiny-cpu.yaml"
    assert "dump:" in path.read_text(encoding="utf-8")
    # A path is a path, found or not (the read reports it missing), even without a suffix.
    local = tmp_path / "tiny-cpu"
    local.write_text("tool:\n  size: 2\n")
    monkeypatch.chdir(tmp_path)
    assert find_preset("tiny-cpu") == (local.relative_to(tmp_path), [])
    assert find_preset("sub/x")[0].as_posix() == "sub/x" and find_preset("x.yaml")[1] == []
    _, problems = find_preset("no-such-preset")
    assert "no bundled preset of that name" in problems[0] and "med42-to-llama3.2-1b" in \
        problems[0] and "tiny-cpu" in problems[0]
    _, _, problems = resolve_fields(TABLE, "tool", "no-such-preset", {})
    assert len(problems) == 1 and "bundled:" in problems[0]


def test_bundled_presets_come_from_the_package_when_installed(tmp_path, monkeypatch):
    package = tmp_path / "fake_presets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "only-here.yaml").write_text("tool:\n  size: 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(options, "PRESETS_PACKAGE", "fake_presets")
    assert sorted(options.bundled_presets()) == ["only-here"]
    assert resolve_fields(TABLE, "tool", "only-here", {})[0]["size"] == 7
    sys.modules.pop("fake_presets", None)
    monkeypatch.setattr(options, "PRESETS_PACKAGE", "no_such_package_of_presets")
    assert "tiny-cpu" in options.bundled_presets()  # missing package: the checkout's configs/


def test_a_yaml_only_field_states_why():
    assert not TABLE["secret"].flag and TABLE["size"].flag
    assert yaml_only_note({"size": TABLE["size"]}, "tool") == ""


@pytest.mark.parametrize("module", ["teacher_dump.config", "student_train.config",
                                    "eval.config"])
def test_every_setting_of_every_tool_has_a_flag_or_a_reason(module):
    import importlib

    fields = importlib.import_module(module).FIELDS
    for name, field in fields.items():
        assert field.flag or len(field.yaml_only) > 10, name
        assert field.default is None or field.problem(field.default) is None, name


def test_data_format_is_checked_alike_in_both_tools():
    from logitstore.errors import ConfigError, LogitStoreError
    from logitstore.toolkit.record_formats import get_format
    from student_train.config import resolve_config as train_config
    from teacher_dump.config import resolve_config as dump_config

    dump = dump_config(None, {"model": "m", "data": ["d.jsonl"], "out": "s",
                              "format": "prompt-completion"})
    train = train_config(None, {"data": ["d.jsonl"], "student": "s", "out": "o",
                                "data_format": "prompt-completion"})
    assert dump.format == train.data_format == "prompt_completion"
    for resolve, key, base in ((dump_config, "format", {"model": "m", "data": ["d"],
                                                        "out": "s"}),
                               (train_config, "data_format", {"data": ["d"], "student": "s",
                                                              "out": "o"})):
        with pytest.raises(ConfigError, match=f"{key} \\(command line\\): must be one of "
                                              f"auto, chat, .*, got 'yaml'"):
            resolve(None, {**base, key: "yaml"})
    assert get_format("prompt-completion").name == "prompt_completion"
    with pytest.raises(LogitStoreError, match="unknown data format 'yaml'"):
        get_format("yaml")


@pytest.mark.parametrize("module,command", [("teacher_dump.cli", "teacher_dump"),
                                            ("eval.cli", "distill_eval")])
def test_verbose_says_why_it_is_not_a_setting(module, command):
    import importlib

    cli = getattr(importlib.import_module(module), command)
    help_text = " ".join(CliRunner().invoke(cli, ["--help"], terminal_width=200).output.split())
    assert "-v, --verbose Log at DEBUG level" in help_text
    assert "not a setting saved with the output" in help_text


def test_progress_is_a_resumable_setting_of_teacher_dump(tmp_path):
    from teacher_dump.cli import teacher_dump
    from teacher_dump.config import FIELDS, resolve_config

    assert FIELDS["progress"].resumable and FIELDS["progress"].default is True
    flags = teacher_dump.make_context("teacher-dump", ["--no-progress"]).params
    preset = tmp_path / "p.yaml"
    preset.write_text("dump:\n  model: m\n  data: [d.jsonl]\n  out: s\n  progress: false\n")
    assert resolve_config(preset).progress is False
    assert resolve_config(preset, {"progress": flags["progress"]}).progress is False
    assert resolve_config(preset, {"progress": True}).progress is True
    assert options.config_differences(resolve_config(preset).as_dict(),
                                      resolve_config(preset, {"progress": True}), FIELDS) == []
