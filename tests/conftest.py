from pathlib import Path

import pytest

from helpers import DEMO_DATA, break_file, entry, write_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is; elsewhere they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu); run tools/gpu_check.sh on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real awkward clips of ../shared/videos (never copied into the repo)."""
    path = (REPO_ROOT / ".." / "shared" / "videos").resolve()
    if not path.is_dir():
        pytest.skip(f"real test videos not found at {path}; these tests need the shared "
                    "clips next to the repository (../shared/videos)")
    return path


@pytest.fixture
def videos(shared_videos):
    return shared_videos


@pytest.fixture
def two_datasets(tmp_path, videos):
    """Dataset "dali" (VP9, MJPEG, VP8: DALI's CPU decoder) and "h264" (H.264 and MPEG-4: the
    PyAV fallback on a CPU machine), each as a manifest of real clips."""
    a = write_manifest(tmp_path / "a", [entry(videos, "derived_juggle_vp9.webm", 0),
                                        entry(videos, "derived_juggle_mjpeg.avi", 1),
                                        entry(videos, "bbb_vp8_vorbis_1s.webm", 2)])
    b = write_manifest(tmp_path / "b", [entry(videos, "k400_arm_wrestling_340x256.mp4", 0),
                                        entry(videos, "carphone_qcif_176x144.mp4", 1),
                                        entry(videos, "ucf101_apply_eye_makeup_xvid_mp3.avi", 2),
                                        entry(videos, "derived_juggle_portrait_360x640.mp4", 1),
                                        entry(videos, "carphone_qcif_176x144.mp4", 0)])
    return [{"name": "dali", "manifest": str(a), "val_manifest": str(a), "test_views": [2, 3]},
            {"name": "h264", "manifest": str(b), "val_manifest": str(b), "flip": False,
             "sampling": "uniform", "test_views": [1, 1]}]


@pytest.fixture
def garbage_vp9(shared_videos, tmp_path) -> Path:
    """A copy of the shared VP9 webm with 4 KiB of random bytes written at half its size.

    PyAV decodes it to the end without raising: FFmpeg only logs demuxer errors, so this
    is the file that trains "fine" while printing errors.
    """
    path = tmp_path / "garbage_vp9.webm"
    break_file(path, "garbage", src=shared_videos / "derived_juggle_vp9.webm")
    return path


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small copy of the demo data (2 training and 1 validation video per class), made once
    for the whole suite; runs write under demo_root / "runs" / <their own name>."""
    from dali_pipes.synthetic import prepare_demo
    root = tmp_path_factory.mktemp("demo")
    prepare_demo(root / "demo_data", progress=False, **DEMO_DATA)
    return root
