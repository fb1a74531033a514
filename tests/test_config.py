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
    (man / "manifest.jsonl").write_text("{}\n")  # one (unused) sample: not empty
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
    with pytest.raises(ConfigError, match=r"'optim.proj_lr_scale': 0.0 is out of range; expected > 0"):
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
    # the authors' AUG.NUM_SAMPLE 2 and TRAIN.BATCH_SIZE in videos (64 x 8 accumulated = 512)
    assert cfg.data.num_sample == 2 and cfg.data.batch_size == 2


@pytest.mark.parametrize("name,copies", [("k400", 2), ("mit", 2), ("activitynet", 2), ("ssv2", 1)])
def test_baselines_repeat_augmentation_as_pyslowfast_mvitv2(name, copies):
    """configs/Kinetics/MVITv2_B_32x3.yaml has AUG.NUM_SAMPLE 2, configs/SSv2/MVITv2_B_32x3.yaml 1;
    the clips per GPU micro-step stay 4 either way (the memory the configs were sized for)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", check_paths=False)
    assert cfg.data.num_sample == copies and cfg.data.batch_size * copies == 4


@pytest.mark.parametrize("override,message", [
    ("data.datasets.0.test_views=[a,b]", r"test_views': expected a list of 2 ints, got \['a', 'b'\]"),
    ("data.datasets.7.stride=2", r"'data.datasets.7' is not an entry of a list of 1"),
    ("data.datasets.x.stride=2", r"'data.datasets.x' is not an entry of a list"),
    ("optim.lr=-1", r"'optim.lr': -1.0 is out of range; expected > 0"),
    ("model.arch=resnet50", r"'model.arch': 'resnet50' is not one of"),
    ("data.mixup_alpha=-1", r"'data.mixup_alpha': -1.0 is out of range; expected >= 0"),
    ("data.label_smoothing=1.5", r"'data.label_smoothing': 1.5 is out of range; expected >= 0 and <= 1"),
    ("optim.betas=[0.9,1.5]", r"'optim.betas': expected two values in \[0, 1\)"),
    ("data.train_scale=[320]", r"'data.train_scale': expected a list of 2 ints"),
    ("train.log_every=-1", r"'train.log_every': -1 is out of range"),
    ("data.num_sample=0", r"'data.num_sample': 0 is out of range; expected >= 1 and <= 8"),
])
def test_values_out_of_range_or_shape_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(minimal(tmp_path), [override])


def test_empty_manifest_names_dataset_and_path(tmp_path):
    raw = minimal(tmp_path)
    (tmp_path / "man" / "manifest.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"dataset 'a': .*man/manifest.jsonl has no samples"):
        config_from_dict(raw)


def test_relative_path_error_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {"data": {"datasets": [{"name": "a", "manifest": "data/m"}]}}
    with pytest.raises(ConfigError, match=rf"taken from the working directory {tmp_path}"):
        config_from_dict(raw)


def test_arch_names_match_the_model_presets():
    from config import ARCHS
    from models import PRESETS
    assert set(ARCHS) == set(PRESETS)


def test_train_cli_fails_fast_on_bad_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(minimal(tmp_path)))
    r = subprocess.run([sys.executable, "train.py", "--cfg", str(cfg), "optim.lrr=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "optim.lrr" in r.stderr and "did you mean 'optim.lr'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("entry", ["train.py", "bench.py", "eval.py"])
def test_config_errors_come_before_torch_is_imported(tmp_path, entry):
    """A torch that cannot be imported: the config error must still be the one reported, and
    no run folder appears (torch and DALI take several seconds to load)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('torch was imported')\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(minimal(tmp_path)))
    args = {"train.py": ["--cfg", cfg], "bench.py": ["--cfg", cfg],
            "eval.py": ["--ckpt", tmp_path, "--cfg", cfg]}[entry]
    r = subprocess.run([sys.executable, entry, *map(str, args), "optim.lr=-1",
                        f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    assert "config error: config key 'optim.lr'" in r.stderr and "torch was imported" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_device_settings_the_machine_lacks_fail_before_the_run_folder(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(minimal(tmp_path)))
    for override, key in (("train.precision=fp16", "train.precision"),
                          ("data.decode_device=gpu", "data.decode_device")):
        r = subprocess.run([sys.executable, "train.py", "--cfg", str(cfg), override,
                            f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"config key '{key}'" in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "run").exists()
