import dataclasses

import pytest
import yaml

from mtrec.config import PRESET_DIR, Config, ConfigError, TaskSpec, load_preset, preset_names


def test_defaults_round_trip_through_dict():
    cfg = Config(tasks=[TaskSpec("click"), TaskSpec("buy", depends_on="click", loss_weight=2.0)])
    again = Config.from_dict(dataclasses.asdict(cfg))
    assert again == cfg
    assert again.tasks[1].label == "buy"  # label defaults to the task name


def test_override_sets_nested_values_with_types():
    cfg = Config().override(["model.arch=ple", "train.lr=1e-3", "train.epochs=5", "train.weighting_params.alpha=1.5"])
    assert cfg.model.arch == "ple"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 5
    assert cfg.train.weighting_params == {"alpha": 1.5}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.archh=mmoe", "unknown key 'model.archh'; valid keys: model.arch"),
        ("modle.arch=mmoe", "valid keys: data, encoder, model, train, tasks"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("model.arch=transformerx", "'transformerx' is not one of 'shared_bottom', 'mmoe', 'ple'"),
        ("train.use_gpu=3", "train.use_gpu: expected true or false"),
        ("train.lr.x=1", "train.lr is a value, not a section"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_override_fails_loudly(override, expected):
    with pytest.raises(ConfigError, match=None) as e:
        Config().override([override])
    assert expected in str(e.value)


def test_every_preset_holds_what_its_file_says_and_unknown_preset_lists_valid_ones():
    names = preset_names()
    assert "synthetic-ecommerce" in names
    for n in names:
        written = yaml.safe_load((PRESET_DIR / f"{n}.yaml").read_text())
        loaded = load_preset(n).to_dict()
        for section, values in written.items():
            if section == "tasks":
                assert [{k: t[k] for k in w} for t, w in zip(loaded["tasks"], values)] == values, n
                assert len(loaded["tasks"]) == len(values), n
            else:
                assert {k: loaded[section][k] for k in values} == values, (n, section)
    with pytest.raises(ConfigError) as e:
        load_preset("no-such-preset")
    assert "synthetic-ecommerce" in str(e.value)


def test_preset_with_bad_key_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_preset(str(p))
    assert "bad.yaml" in str(e.value) and "train.epoch" in str(e.value)


def test_mtrec_core_never_imports_ray():
    import subprocess
    import sys

    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is blocked: mtrec must not import it')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mtrec\n"
        "for m in pkgutil.walk_packages(mtrec.__path__, 'mtrec.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_the_readme_documents_every_config_field():
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        names = (
            [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
            if dataclasses.is_dataclass(value)
            else [section.name]
        )
        for name in names:
            assert f"`{name}`" in readme, f"README's configuration table lacks {name}"


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (no packages): two with one name break collection."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in (Path(__file__).resolve().parents[1]).rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
