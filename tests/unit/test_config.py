import json
from typing import Literal, get_args, get_origin

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from phalanx import config as C
from phalanx.commands import main
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


def test_default_run_dir_names_the_model_without_characters_a_path_tool_would_misread():
    from pathlib import Path
    cfg = C.build_config(None, [("model.name", "timm:resnet18"), ("out_dir", "somewhere")])
    name = Path(cfg.default_run_dir())
    assert name.parent == Path("somewhere")
    assert name.name.endswith("-timm-resnet18") and ":" not in name.name
    assert C.build_config(None, []).default_run_dir().endswith("-phalanx_cnn")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'"):
        C.build_config(None, [("optim.lrr", "0.1")])


@pytest.mark.parametrize("name", sorted(p.stem for p in C.RECIPES_DIR.glob("*.toml")))
def test_every_packaged_recipe_validates_as_written_and_says_how_to_use_it(name):
    import tomllib
    path = C.resolve_recipe(name)
    written = tomllib.loads(path.read_text())
    cfg = C.build_config(name, [])
    for table, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, table), key) == value, f"{name}: {table}.{key}"
        else:
            assert getattr(cfg, table) == values, f"{name}: {table}"
    assert path.read_text().startswith("#") and ("Use: phalanx train" in path.read_text() or name == "fashion_mnist")


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text("[optim]\nmomentun = 0.9\n")
    with pytest.raises(ConfigError, match=r"r.toml.*did you mean 'optim.momentum'"):
        C.build_config(str(r), [])


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lr", "-1", "optim.lr=-1.0: must be a positive number"),
    ("global_batch", "0", "global_batch=0: must be >= 1"),
    ("epochs", "-2", "epochs=-2: must be >= 1"),
    ("epochs", "0", "epochs=0: must be >= 1 (to evaluate saved weights: `phalanx eval RUN_DIR`)"),
    ("global_batch", "9" * 20, "global_batch=99999999999999999999: is out of range"),
    ("seed", "9" * 20, "seed=99999999999999999999: is out of range"),
    ("augment.cutout", "9" * 20, "augment.cutout=99999999999999999999: is out of range"),
    ("model.width", "100000", "model.width=100000: must be in 1..1024"),
    ("nproc", "²", "parallel.nproc='²': must be a positive number"),
    ("parallel.timeout_s", "inf", "parallel.timeout_s=inf: must be in (0, 2592000] seconds"),
    ("parallel.bucket_mb", "1e300", "parallel.bucket_mb=1e+300: must be in (0, 1048576] MiB"),
    ("optim.weight_decay", "inf", "optim.weight_decay=inf: must be in [0, 1000]"),
    ("optim.lr", "1e30", "optim.lr=1e+30: must be a positive number up to 1000"),
    ("ckpt.every_minutes", "inf", "ckpt.every_minutes=inf: must be a finite number"),
    ("optim.lr", "nan", "optim.lr=nan: must be a positive number"),
    ("epochs", "many", "expected an integer"),
    ("precision", "fp8", "choose one of auto, bf16, fp16, fp32"),
    ("tta_flip", "maybe", "expected true or false"),
])
def test_bad_values_fail_with_one_clear_line(key, value, needle):
    with pytest.raises(ConfigError) as e:
        C.build_config(None, [(key, value)])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content,needle", [
    (b"epochs = 3\n# caf\xe9, saved as Latin-1\n", "not UTF-8 text (byte 0xe9 at offset 16); save it as UTF-8"),
    (b"\xff\xfe" + "epochs = 3\n".encode("utf-16-le"), "not UTF-8 text (byte 0xff at offset 0)"),
    (b"epochs = " + b"9" * 5000 + b"\n", "Exceeds the limit (4300 digits)"),
    (b"epochs = 3\n[optim\nlr = 1\n", "Expected ']' at the end of a table declaration"),
])
def test_a_bad_recipe_file_exits_2_with_one_line_naming_it(tmp_path, capsys, content, needle):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(content)
    code = main(["train", "--recipe", str(recipe), f"--out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"recipe {recipe}: {needle}" in err, err
    assert not (tmp_path / "runs").exists()


def test_an_integer_of_thousands_of_digits_is_one_line(capsys):
    with pytest.raises(ConfigError, match=r"^epochs='9{20}.*: expected an integer$"):
        C.build_config(None, [("epochs", "9" * 5000)])


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


# ----------------------------------------------------------------------------- any input: a config or one line

FIELDS = C.fields_of()
KEYS = [i.key for i in FIELDS]
LEAVES = sorted({k.rsplit(".", 1)[-1] for k in KEYS})
CHOICES = sorted({str(c) for i in FIELDS if get_origin(i.type) is Literal for c in get_args(i.type)})
WORDS = ["auto", "true", "false", "yes", "off", "nan", "-nan", "inf", "-inf", "1e309", "1e30", "-0", "0", "1", "-1",
         "2", "0x10", "1_000", "0b11", "1e3", "0.5", "²", "٣", " 2", "", "9" * 19, "9" * 25, "9" * 5000, "a\x00b",
         "a\nb", "tab\t", "\udcff", "résumé", "2**63", "100000"]
CLI_VALUES = st.one_of(st.sampled_from(WORDS + CHOICES), st.integers().map(str), st.floats().map(repr),
                       st.integers(-2 ** 70, 2 ** 70).map(str), st.text(max_size=10))
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def plausible_pairs(draw):
    """(key, value) of the field's own kind, so that many configs are valid and get round-tripped."""
    info = draw(st.sampled_from(FIELDS))
    t = info.type
    value = (draw(st.sampled_from(get_args(t))) if get_origin(t) is Literal
             else draw(st.sampled_from(["true", "false"])) if t is bool
             else str(draw(st.integers(0, 4) | st.integers())) if t is int
             else repr(draw(st.floats(0, 1) | st.floats())) if t is float
             else draw(st.text(max_size=8)))
    return info.key, value


def _config_or_one_line(build) -> C.Config | None:
    """build(): a valid Config, or a ConfigError of one line; any other exception fails the test."""
    try:
        cfg = build()
    except ConfigError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and msg.strip() == msg and msg.isprintable(), repr(msg)
        event("refused")
        return None
    event("valid")
    assert cfg.validate() is cfg
    return cfg


def _round_trips(cfg: C.Config, path) -> None:
    """A valid config is written as config.toml and read back unchanged (what `phalanx eval RUN_DIR` does)."""
    path.write_text(C.to_toml(cfg), encoding="utf-8")
    assert C.to_dict(C.build_config(str(path), [])) == C.to_dict(cfg)


@SETTINGS
@given(st.lists(plausible_pairs() | st.tuples(st.sampled_from(KEYS) | st.sampled_from(LEAVES) | st.text(max_size=8),
                                              CLI_VALUES), min_size=1, max_size=3))
@example([("global_batch", "9" * 20)])
@example([("epochs", "0")])
@example([("nproc", "²")])
@example([("run_dir", "a\nb")])
@example([("data.path", "caf\udce9")])  # a Latin-1 byte in a UTF-8 command line
@example([("optim.lr", "1e30")])
@example([("parallel.timeout_s", "inf")])
def test_any_command_line_value_gives_a_valid_config_or_one_config_error_line(tmp_path, pairs):
    cfg = _config_or_one_line(lambda: C.build_config(None, pairs))
    if cfg is not None:
        _round_trips(cfg, tmp_path / "config.toml")


def _toml_float(x: float) -> str:
    return "nan" if x != x else {float("inf"): "inf", float("-inf"): "-inf"}.get(x, repr(x))


TOML_VALUES = st.one_of(
    st.integers().map(str), st.integers(-2 ** 70, 2 ** 70).map(str), st.floats().map(_toml_float),
    st.booleans().map(lambda b: "true" if b else "false"), st.text(max_size=10).map(json.dumps),
    st.sampled_from(CHOICES).map(json.dumps),
    st.sampled_from(['"auto"', "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "[]", '[1, "a"]', "{}", "{a = 1}",
                     "0x10", "1_000", '"²"', '"\\u0000"', '"9999999999999999999999"', "9" * 5000, "'lit'"]))
TOML_LINES = st.one_of(
    st.tuples(st.one_of(st.sampled_from(KEYS + LEAVES), st.text(max_size=8).map(json.dumps)), TOML_VALUES)
    .map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(["[optim]", "[data]", "[parallel]", "[nope]", "[optim.lr]", "[[optim]]", "x =", "= 1"]),
    # a value of the field's own kind, written as TOML: many such recipes are valid
    plausible_pairs().map(lambda kv: f"{kv[0]} = " + (kv[1] if kv[1] in ("true", "false") or kv[1][-1:].isdigit()
                                                      else json.dumps(kv[1]))))
TOML_DOCS = st.lists(TOML_LINES, max_size=6).map("\n".join)
RECIPES = st.one_of(st.binary(max_size=80), TOML_DOCS.map(str.encode), TOML_DOCS.map(lambda d: d.encode("utf-16")),
                    TOML_DOCS.map(lambda d: d.encode() + b"\n# \xff\n"),
                    TOML_DOCS.map(lambda d: d.encode("utf-8", "surrogatepass")))


@SETTINGS
@given(RECIPES)
@example(b"epochs = 3\n# caf\xe9\n")
@example(b"epochs = " + b"9" * 5000)
@example(b"[optim]\nlr = \"fast\"\n")
@example(b"[optim]\nlr = nan\n")
@example(b'run_dir = "\\u0007"\n')
@example(b"[model]\nname = 1979-05-27\n")
@example(b"epochs = [1, 2]\n")
@example(b"optim = 3\n")
def test_any_recipe_file_gives_a_valid_config_or_one_config_error_line(tmp_path, content):
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(content)
    cfg = _config_or_one_line(lambda: C.build_config(str(recipe), []))
    if cfg is not None:
        _round_trips(cfg, tmp_path / "config.toml")


@pytest.mark.parametrize("args,needle", [
    (["--global_batch", "9" * 20], "phalanx: error: global_batch=99999999999999999999: is out of range"),
    (["--recipe", "{latin1}"], "phalanx: error: recipe {latin1}: not UTF-8 text (byte 0xe9 at offset 16)"),
])
def test_phalanx_train_with_a_bad_value_exits_2_with_one_line_and_no_traceback(tmp_path, args, needle):
    from tests.conftest import run_phalanx
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"epochs = 3\n# caf\xe9\n")
    args = [a.format(latin1=latin1) for a in args]
    r = run_phalanx(["train", *args, "--out_dir", tmp_path / "runs"], tmp_path / "cache", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and needle.format(latin1=latin1) in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == "" and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
