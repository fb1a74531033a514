"""Config errors surface before any work, naming the key and what was expected."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def minimal(tmp_path):
    man = tmp_path / "man"
    man.mkdir(exist_ok=True)
    (man / "manifest.jsonl").write_text("")
    return {"data": {"datasets": [{"name": "a", "manifest": str(man)}]}}


def test_unknown_key_suggests_closest(tmp_path):
    raw = minimal(tmp_path)
    raw["optim"] = {"weight_decy": 0.1}
    with pytest.raises(ConfigError, match=r"'optim.weight_decy'.*did you mean 'optim.weight_decay'"):
        config_from_dict(raw)


def test_unknown_key_inside_dataset_entry(tmp_path):
    raw = minimal(tmp_path)
    raw["data"]["datasets"][0]["strid"] = 2
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].strid.*did you mean.*stride"):
        config_from_dict(raw)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.batch_size': expected int, got str 'eight'"):
        config_from_dict(minimal(tmp_path), ["data.batch_size=eight"])
    with pytest.raises(ConfigError, match=r"'model.drop_path': expected float, got bool"):
        config_from_dict(minimal(tmp_path), ["model.drop_path=true"])


def test_missing_manifest_and_pretrained_paths(tmp_path):
    raw = minimal(tmp_path)
    raw["data"]["datasets"][0]["manifest"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].manifest.*no manifest.jsonl.*dali_pipes.manifest"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"model.pretrained.*does not exist"):
        config_from_dict(minimal(tmp_path), [f"model.pretrained={tmp_path / 'x.pyth'}"])


def test_bad_choice_and_duplicate_names(tmp_path):
    with pytest.raises(ConfigError, match=r"train.precision.*'fp8'"):
        config_from_dict(minimal(tmp_path), ["train.precision=fp8"])
    raw = minimal(tmp_path)
    raw["data"]["datasets"].append(dict(raw["data"]["datasets"][0]))
    with pytest.raises(ConfigError, match="used twice"):
        config_from_dict(raw)


def test_projection_lr_scale_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.proj_lr_scale': expected a multiplier > 0.*got 0.0"):
        config_from_dict(minimal(tmp_path), ["optim.proj_lr_scale=0.0"])


def test_overrides_reach_nested_and_list_fields(tmp_path):
    cfg = config_from_dict(minimal(tmp_path), ["optim.lr=1e-4", "data.datasets.0.test_views=[5,1]",
                                               "data.train_scale=[64,80]"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.datasets[0].test_views == [5, 1]
    assert cfg.data.train_scale == [64, 80]


@pytest.mark.parametrize("name", ["multi", "multi_k700", "k400", "ssv2", "mit", "activitynet", "demo"])
def test_shipped_configs_parse(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", check_paths=False)
    assert cfg.data.datasets


def test_multi_yaml_is_the_paper_recipe():
    cfg = load_config(ROOT / "configs" / "multi.yaml", check_paths=False)
    names = [d.name for d in cfg.data.datasets]
    assert names == ["k400", "mit", "ssv2", "activitynet"]
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.epochs, o.warmup_epochs, o.global_batch) == (2e-4, 0.05, 50, 10, 512)
    assert (o.warmup_start_lr, o.clip_grad) == (2e-6, 1.0)
    assert cfg.model.arch == "mvitv2_b_32x3" and cfg.model.pretrained
    ssv2 = cfg.data.datasets[2]
    assert ssv2.sampling == "uniform" and ssv2.flip is False
    assert all(d.stride == 3 for d in cfg.data.datasets if d.sampling == "stride")
    assert cfg.data.train_scale == [256, 320] and cfg.data.test_scale == 256
    assert (cfg.loss.w_proj, cfg.loss.w_inf) == (1.0, 0.1)


def test_train_cli_fails_fast_on_bad_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(minimal(tmp_path)))
    r = subprocess.run([sys.executable, "train.py", "--cfg", str(cfg), "optim.lrr=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "optim.lrr" in r.stderr and "did you mean 'optim.lr'" in r.stderr
    assert "Traceback" not in r.stderr
