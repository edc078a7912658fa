"""Both commands build their options from the settings' declarations: every settings field is an option of its
command, an option the two commands share has the same type, choices and description in both, and the defaults
``compare.py --help`` shows are the presets' values."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from adamhd_study import cli as study_cli
from adamhd_study.config import CompareConfig, gpt3_small, tiny
from adamhd_train import cli as train_cli
from adamhd_train.options import add_options, cli_option, option, parse_count
from adamhd_train.settings import FROM_MANIFEST_OVERRIDES, TrainSettings


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def test_every_train_setting_is_one_launcher_option():
    actions = _actions(train_cli.build_parser())
    fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"launch"}  # set by --deepspeed / --fsdp
    assert fields <= set(actions), sorted(fields - set(actions))
    for name in fields:
        assert actions[name].default is None, name  # not given: the resolver picks the default
        marked = actions[name].help.startswith("* ")
        assert marked == (name in FROM_MANIFEST_OVERRIDES), name


def test_every_compare_field_is_one_study_option():
    actions = _actions(study_cli.build_parser())
    fields = {f.name for f in dataclasses.fields(CompareConfig)} - {"preset"}  # --preset picks the starting values
    assert fields <= set(actions), sorted(fields - set(actions))
    declared = [*sum(study_cli.STUDY_OPTIONS.values(), ()), *sum(study_cli.LAUNCHER_OPTIONS.values(), ())]
    assert len(declared) == len(set(declared))


def test_shared_options_have_one_type_choices_and_description():
    train, study = _actions(train_cli.build_parser()), _actions(study_cli.build_parser())
    shared = sum(study_cli.LAUNCHER_OPTIONS.values(), ())
    assert len(shared) >= 16
    for name in shared:
        a, b = train[name], study[name]
        assert a.option_strings == b.option_strings and a.type is b.type and a.choices == b.choices, name
        description = cli_option(TrainSettings, name).help
        assert description in a.help and description in b.help, name
    assert train["max_steps"].type is parse_count and train["lr"].type is float


def test_study_defaults_shown_are_the_presets_values():
    shown = study_cli.preset_defaults(("max_steps", "micro_batch", "lr", "final_eval_batches"))
    t, g = tiny(), gpt3_small()
    assert shown["max_steps"] == f"tiny: {t.max_steps}, gpt3-small: {g.max_steps}"
    assert t.micro_batch == g.micro_batch and shown["micro_batch"] == str(t.micro_batch)
    assert shown["lr"] == "the launcher's"  # no preset sets it: the model's
    assert shown["final_eval_batches"] == f"tiny: {t.final_eval_batches}, gpt3-small: {g.final_eval_batches}"


def test_parsed_options_reach_the_settings_names():
    args = train_cli.build_parser().parse_args(["--fsdp", "--max-steps", "2k", "--no-tensorboard",
                                                "--no-activation-checkpointing", "--deepspeed", "x.json"])
    given = train_cli.given_options(args)
    assert given["max_steps"] == 2000 and given["tensorboard"] is False
    assert given["activation_checkpointing"] is False and given["deepspeed_config"] == "x.json"
    assert given["lr"] is None and given["seed"] is None
    args = study_cli.build_parser().parse_args(["--optimizer", "a=x.json", "--optimizer", "b=y.json",
                                                "--arms", "baseline,outliers", "--sparsities", "0,0.5",
                                                "--run-timeout", "60"])
    assert args.optimizers == [("a", "x.json"), ("b", "y.json")]
    assert args.arms == ("baseline", "outliers") and args.sparsities == (0.0, 0.5) and args.run_timeout_s == 60.0


def test_a_field_without_an_option_is_refused():
    @dataclasses.dataclass
    class Settings:
        plain: int = 1
        counted: int = option("a count", default=2)

    parser = argparse.ArgumentParser()
    add_options(parser, Settings, ("counted",))
    assert parser.parse_args(["--counted", "3k"]).counted == 3000
    with pytest.raises(KeyError, match="plain"):
        add_options(parser, Settings, ("plain",))
