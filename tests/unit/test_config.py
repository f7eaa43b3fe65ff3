import pytest

from phalanx import config as C
from phalanx.cli import main
from phalanx.errors import ConfigError


def test_default_recipe_resolves_and_validates():
    from pathlib import Path

    import tomllib
    recipe = tomllib.loads((Path(C.__file__).parent / "recipes" / "fashion_mnist.toml").read_text())
    cfg = C.build_config(None, [])
    assert cfg.model.name == "phalanx_cnn"
    assert cfg.data.path == "fashion_mnist"
    # the recipe's values, not the dataclass defaults, are what `phalanx train` runs
    assert (cfg.epochs, cfg.global_batch, cfg.optim.lr) == (recipe["epochs"], recipe["global_batch"],
                                                            recipe["optim"]["lr"])


def test_overrides_dotted_and_leaf_names_and_types():
    cfg = C.build_config(None, [("optim.lr", "0.05"), ("epochs", "3"), ("flip", "false"), ("nproc", "2")])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 3
    assert cfg.augment.flip is False
    assert cfg.parallel.nproc == "2"


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'"):
        C.build_config(None, [("optim.lrr", "0.1")])


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text("[optim]\nmomentun = 0.9\n")
    with pytest.raises(ConfigError, match=r"r.toml.*did you mean 'optim.momentum'"):
        C.build_config(str(r), [])


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lr", "-1", "optim.lr=-1.0: must be a positive number"),
    ("global_batch", "0", "global_batch=0: must be >= 1"),
    ("epochs", "-2", "epochs=-2: must be >= 0"),
    ("model.name", "resnt18", "did you mean 'resnet18'"),
    ("epochs", "many", "expected an integer"),
    ("precision", "fp8", "choose one of auto, bf16, fp16, fp32"),
    ("tta_flip", "maybe", "expected true or false"),
])
def test_bad_values_fail_with_one_clear_line(key, value, needle):
    with pytest.raises(ConfigError) as e:
        C.build_config(None, [(key, value)])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_bad_lr_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    code = main(["train", "--optim.lr=-1", f"--out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "optim.lr" in err
    assert not (tmp_path / "runs").exists()


def test_every_field_has_a_docstring_and_appears_in_help(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for info in C.fields_of():
        assert info.doc, f"{info.key} has no docstring"
        assert f"--{info.key}=" in out


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = C.build_config(None, [("optim.lr", "0.123"), ("run_dir", 'a "quoted" dir')])
    p = tmp_path / "c.toml"
    p.write_text(C.to_toml(cfg))
    again = C.build_config(str(p), [])
    assert C.to_dict(again) == C.to_dict(cfg)
