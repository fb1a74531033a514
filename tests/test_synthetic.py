"""The embedded synthetic demo dataset: generation, official formats, DALI decoding."""
import json
from pathlib import Path

import numpy as np
import pytest

from dali_pipes import synthetic
from dali_pipes.manifest import load_manifest

EXPECTED = {  # name: (format, classes, frames per video)
    "shapecolor": ("kinetics", 9, synthetic.CLIP_FRAMES),
    "shape": ("activitynet", 3, synthetic.ACTIVITYNET_FRAMES),
    "color": ("ssv2", 3, synthetic.CLIP_FRAMES),
    "direction": ("mit", 4, synthetic.CLIP_FRAMES),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return synthetic.prepare_demo(out, workers=2, videos_per_class=1, val_per_class=1,
                                  seed=3, progress=False)


def test_manifests_build_without_quarantine(demo):
    assert demo["generated"] is True
    assert set(demo["manifests"]) == set(EXPECTED)
    for name, (fmt, n_classes, _) in EXPECTED.items():
        for split in ("train", "val"):
            summary = demo["summaries"][f"{name}/{split}"]
            assert summary["format"] == fmt
            assert summary["num_quarantined"] == 0, (name, split)
            records, classes = load_manifest(demo["manifests"][name][split])
            assert len(classes) == n_classes
            # one video per class and split (direction: SIZE_FACTOR); every class present
            per_class = synthetic.SIZE_FACTOR[name]
            assert sorted(r["label"] for r in records) == sorted(list(range(n_classes)) * per_class), (name, split)


def test_train_and_val_share_class_lists(demo):
    for name in EXPECTED:
        _, train = load_manifest(demo["manifests"][name]["train"])
        _, val = load_manifest(demo["manifests"][name]["val"])
        assert train == val, name


def test_probe_and_dali_decode(demo):
    for name, (_, _, frames) in EXPECTED.items():
        records, _ = load_manifest(demo["manifests"][name]["train"])
        for r in records:
            p = r["probe"]
            assert (p["codec"], p["num_frames"]) == ("vp9", frames)
            assert (p["width"], p["height"]) == (synthetic.WIDTH, synthetic.HEIGHT)
        # DALI's CPU decoder must read what was written (one per dataset keeps it quick).
        assert synthetic.check_dali_decode(records[0]["path"]) == (
            frames, synthetic.HEIGHT, synthetic.WIDTH)


def test_activitynet_segment_is_where_the_shape_is(demo):
    records, _ = load_manifest(demo["manifests"]["shape"]["train"])
    r = records[0]
    assert 0 <= r["start"] < r["end"] <= r["probe"]["duration"] + 1e-6
    import av

    with av.open(r["path"]) as c:
        frames = [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(video=0)]
    inside = int(round((r["start"] + r["end"]) / 2 * synthetic.FPS))
    outside = 0 if r["start"] > 0.2 else len(frames) - 1

    def saturation(img):
        return (img.max(axis=2) - img.min(axis=2)).max()

    # Only the shape is strongly coloured; the background is grey-ish noise.
    assert saturation(frames[inside]) > 120
    assert saturation(frames[outside]) < 100


def test_relations_consistent_with_classes(demo):
    rel = json.loads(Path(demo["relations"]).read_text())
    classes = {n: load_manifest(demo["manifests"][n]["train"])[1] for n in EXPECTED}
    pairs = {(r["source"], r["target"]) for r in rel}
    assert pairs == {("shapecolor", "shape"), ("shapecolor", "color"),
                     ("shape", "shapecolor"), ("color", "shapecolor")}
    for r in rel:
        assert r["source_class"] in classes[r["source"]]
        assert set(r["target_classes"]) <= set(classes[r["target"]])
    # every source class of a related pair is covered exactly once per target
    for src, tgt in pairs:
        covered = [r["source_class"] for r in rel if (r["source"], r["target"]) == (src, tgt)]
        assert sorted(covered) == sorted(classes[src])
    red_ring = [r for r in rel if r["source_class"] == "red ring"]
    assert {r["target"]: r["target_classes"] for r in red_ring} == {
        "shape": ["ring"], "color": ["Showing something that is red"]}


def test_datasets_json(demo):
    info = json.loads((Path(demo["data"]) / "datasets.json").read_text())
    by_name = {d["name"]: d for d in info["datasets"]}
    assert by_name["direction"]["flip"] is False
    assert by_name["shapecolor"]["flip"] is True
    for name, (fmt, _, _) in EXPECTED.items():
        d = by_name[name]
        assert d["format"] == fmt
        assert Path(d["root"]).is_dir()
        for split in ("train", "val"):
            assert Path(d["annotations"][split]).is_file()
            assert d["manifest_commands"][split].startswith(
                f"python -m dali_pipes.manifest {fmt} ")


def test_official_formats_on_disk(demo):
    data = Path(demo["data"])
    header = (data / "shapecolor/annotations/train.csv").read_text().splitlines()[0]
    assert header == "label,youtube_id,time_start,time_end,split"
    kin = next((data / "shapecolor/videos").rglob("*.webm"))
    assert kin.parent.name in synthetic.shapecolor_classes()
    assert kin.stem.endswith("_000000_000002")
    anet = json.loads((data / "shape/annotations/activity_net.v1-3.min.json").read_text())
    assert {v["subset"] for v in anet["database"].values()} == {"training", "validation"}
    ssv2 = json.loads((data / "color/annotations/something-something-v2-train.json")
                      .read_text())
    assert all("[something]" in item["template"] for item in ssv2)
    labels = json.loads((data / "color/annotations/something-something-v2-labels.json")
                        .read_text())
    assert all(isinstance(v, str) for v in labels.values())


def test_prepare_demo_is_idempotent(demo):
    again = synthetic.prepare_demo(Path(demo["data"]).parent, workers=1, videos_per_class=1,
                                   val_per_class=1, seed=3, progress=False)
    assert again["generated"] is False
    assert all(s["probed"] == 0 for s in again["summaries"].values())


def test_deterministic_from_seed():
    def clip(seed):
        rng = np.random.default_rng(seed)
        return synthetic.render_clip(rng, "square", "green", "up", 6)
    assert np.array_equal(clip(5), clip(5))
    assert not np.array_equal(clip(5), clip(6))


@pytest.mark.parametrize("direction", synthetic.DIRECTIONS)
def test_direction_of_motion(direction):
    rng = np.random.default_rng(1)
    clip = synthetic.render_clip(rng, "ring", "red", direction, 20)

    def centre(img):
        mask = (img[..., 0].astype(int) - img[..., 1]) > 100  # strongly red pixels
        ys, xs = np.nonzero(mask)
        return xs.mean(), ys.mean()

    (x0, y0), (x1, y1) = centre(clip[0]), centre(clip[-1])
    dx, dy = x1 - x0, y1 - y0
    expected = {"left": dx < -15, "right": dx > 15, "up": dy < -10, "down": dy > 10}
    assert expected[direction], (dx, dy)
    assert (abs(dy) < 3) if direction in ("left", "right") else (abs(dx) < 3)


def test_cli_generate(tmp_path):
    assert synthetic.main(["--out", str(tmp_path), "--videos-per-class", "1",
                           "--workers", "1", "--no-verify"]) == 0
    info = json.loads((tmp_path / "datasets.json").read_text())
    assert info["num_videos"] == 2 * (9 + 3 + 3 + 4 * synthetic.SIZE_FACTOR["direction"])
    assert len(list(tmp_path.rglob("*.webm"))) == info["num_videos"]
