"""probe_video on the real awkward clips and on broken files."""

import pytest

from dali_pipes.probe import ProbeError, probe_video
from helpers import break_file

# From ../shared/videos/README.md: codec, stored width, height, full-decode frame count,
# and whether the README calls the clip variable-frame-rate.
README = {
    "k400_arm_wrestling_340x256.mp4": ("h264", 340, 256, 280, False),
    "k400_pool_cleaning_1s_32f.mp4": ("h264", 340, 256, 32, True),
    "ucf101_apply_eye_makeup_xvid_mp3.avi": ("mpeg4", 320, 240, 164, False),
    "ntu_hug_1080p_vfr.mp4": ("h264", 1920, 1080, 72, True),
    "sam2_juggle_720p24.mp4": ("h264", 1280, 720, 247, False),
    "derived_juggle_vp9.webm": ("vp9", 640, 360, 72, False),
    "derived_juggle_mjpeg.avi": ("mjpeg", 480, 270, 72, False),
    "derived_juggle_rot90_640x360.mp4": ("h264", 640, 360, 72, False),
    "derived_juggle_portrait_360x640.mp4": ("h264", 360, 640, 72, False),
    "bbb_vp8_vorbis_1s.webm": ("vp8", 1280, 720, 24, False),
    "browser_vp9_opus_noduration.webm": ("vp9", 1280, 720, 74, True),
    "nasa_multistream.mp4": ("h264", 320, 180, 325, False),
    "carphone_qcif_176x144.mp4": ("h264", 176, 144, 120, False),
    "mmpose_street_5fps_5f.mp4": ("h264", 960, 540, 5, False),
}


@pytest.fixture(scope="module")
def probes(shared_videos):
    missing = [n for n in README if not (shared_videos / n).is_file()]
    if missing:
        pytest.skip(f"shared clips missing from {shared_videos}: {missing}")
    return {name: probe_video(shared_videos / name) for name in README}


@pytest.mark.parametrize("name", sorted(README))
def test_probe_matches_readme(probes, shared_videos, name):
    codec, width, height, frames, vfr = README[name]
    p = probes[name]
    assert (p["codec"], p["width"], p["height"]) == (codec, width, height)
    # VFR clips: a decoder may disagree by one frame on a duplicated/dropped timestamp.
    assert abs(p["num_frames"] - frames) <= (1 if vfr else 0), p
    assert p["size"] == (shared_videos / name).stat().st_size
    assert p["mtime"] == pytest.approx((shared_videos / name).stat().st_mtime)
    assert p["fps"] > 0 and p["duration"] > 0
    assert p["pix_fmt"]
    assert p["decode_errors"] == []


def test_vfr_flags(probes):
    for name in ("ntu_hug_1080p_vfr.mp4", "k400_pool_cleaning_1s_32f.mp4",
                 "browser_vp9_opus_noduration.webm"):
        assert probes[name]["vfr"] is True, name
    for name in ("sam2_juggle_720p24.mp4", "carphone_qcif_176x144.mp4",
                 "derived_juggle_vp9.webm"):
        assert probes[name]["vfr"] is False, name


def test_duration_without_header(probes):
    # No duration in the header: it must come from the packet timestamps (74 frames, ~15 fps).
    assert probes["browser_vp9_opus_noduration.webm"]["duration"] == pytest.approx(4.94, abs=0.1)


def test_rotation(probes):
    """The clip stores landscape frames with a display matrix of -90 degrees (counter-clockwise),
    which FFmpeg's autorotate shows turned 90 degrees clockwise: rotation 90 (clockwise) is the
    turn that makes it upright, 270 would show it upside down (tests/test_rotation.py checks
    the decoded frames end to end)."""
    rot = probes["derived_juggle_rot90_640x360.mp4"]
    assert rot["rotation"] == 90
    assert (rot["display_width"], rot["display_height"]) == (360, 640)
    assert probes["derived_juggle_portrait_360x640.mp4"]["rotation"] == 0
    assert probes["sam2_juggle_720p24.mp4"]["rotation"] == 0


def test_multistream_picks_first_video_stream(probes):
    # Documented choice: the stream DALI decodes, i.e. the first video stream.
    p = probes["nasa_multistream.mp4"]
    assert p["stream_index"] == 0
    assert [s["index"] for s in p["video_streams"]] == [0, 3]
    assert (p["width"], p["height"], p["fps"]) == (320, 180, 25.0)


def test_cheap_mode_agrees_on_good_files(shared_videos, probes):
    # The first+last-GOP check used for big files must count like the full decode.
    for name in ("sam2_juggle_720p24.mp4", "derived_juggle_vp9.webm", "nasa_multistream.mp4"):
        cheap = probe_video(shared_videos / name, full_decode_max_pixels=0)
        assert cheap["decode_check"] == "ends"
        assert cheap["num_frames"] == probes[name]["num_frames"], name


# ---------------------------------------------------------------- broken files

def test_missing_file(tmp_path):
    with pytest.raises(ProbeError, match="does not exist") as err:
        probe_video(tmp_path / "nope.mp4")
    assert err.value.path.endswith("nope.mp4")
    assert isinstance(err.value, ValueError)


def test_zero_bytes(tmp_path):
    with pytest.raises(ProbeError, match="empty"):
        probe_video(break_file(tmp_path / "empty.mp4", "empty"))


def test_text_named_mp4(tmp_path):
    with pytest.raises(ProbeError, match="not a readable media file"):
        probe_video(break_file(tmp_path / "notes.mp4", "text"))


def test_audio_only_has_no_video_stream(tmp_path):
    import av
    import numpy as np

    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(ProbeError, match="no video stream"):
        probe_video(path)


@pytest.mark.parametrize("name", ["sam2_juggle_720p24.mp4", "k400_arm_wrestling_340x256.mp4",
                                  "ucf101_apply_eye_makeup_xvid_mp3.avi"])
def test_truncated_is_rejected(shared_videos, tmp_path, name):
    # sam2 keeps its index up front (header claims 247 frames, data for ~35): the case
    # DALI silently decodes to nothing. k400 has its index at the end: unreadable.
    bad = break_file(tmp_path / name, "truncated", src=shared_videos / name, fraction=0.3)
    with pytest.raises(ProbeError, match="truncated"):
        probe_video(bad)
    with pytest.raises(ProbeError, match="truncated"):
        probe_video(bad, full_decode_max_pixels=0)


def test_timeout_kills_the_probe(shared_videos):
    with pytest.raises(ProbeError, match="timed out"):
        probe_video(shared_videos / "sam2_juggle_720p24.mp4", timeout=1e-4)


def test_in_process_probe_equals_child_probe(shared_videos, probes):
    name = "carphone_qcif_176x144.mp4"
    assert probe_video(shared_videos / name, timeout=None) == probes[name]


def test_probe_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ProbeError("/x.mp4", "broken")))
    assert (err.path, err.reason) == ("/x.mp4", "broken")
    assert "/x.mp4" in str(err) and "broken" in str(err)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ProbeError, match="not a regular file"):
        probe_video(break_file(tmp_path / "clip.mp4", "directory"))


# ---------------------------------------------------------------- decode errors

def test_garbage_in_the_middle_is_silent_for_plain_pyav(garbage_vp9):
    import av

    # The case the probe exists for: no exception, frames come out, errors only logged.
    with av.open(str(garbage_vp9)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames > 0


@pytest.mark.parametrize("timeout", [60.0, None], ids=["forked-child", "in-process"])
@pytest.mark.parametrize("max_pixels", [None, 0], ids=["full", "ends"])
def test_decode_errors_are_recorded(garbage_vp9, timeout, max_pixels):
    kwargs = {} if max_pixels is None else {"full_decode_max_pixels": max_pixels}
    errors = probe_video(garbage_vp9, timeout=timeout, **kwargs)["decode_errors"]
    assert 1 <= len(errors) <= 5
    assert len(set(errors)) == len(errors)
    assert all(isinstance(e, str) and 0 < len(e) <= 200 for e in errors)
    assert any(e.startswith("matroska,webm: ") for e in errors), errors


def test_same_errors_on_every_probe(garbage_vp9):
    # PyAV drops a log line identical to the previous one, even across files; a second
    # probe of the same file must not come back clean because of that.
    first = probe_video(garbage_vp9, timeout=None)["decode_errors"]
    assert first and probe_video(garbage_vp9, timeout=None)["decode_errors"] == first


def test_decode_error_capture_restores_log_settings(garbage_vp9):
    import av.logging as avlog

    level, skip = avlog.get_level(), avlog.get_skip_repeated()
    try:
        avlog.set_level(avlog.WARNING)
        assert probe_video(garbage_vp9, timeout=None)["decode_errors"]
        assert (avlog.get_level(), avlog.get_skip_repeated()) == (avlog.WARNING, skip)
        avlog.set_level(None)
        assert probe_video(garbage_vp9, timeout=None)["decode_errors"]
        assert avlog.get_level() is None
        # Nothing keeps capturing after the probe: a new log line reaches a new capture.
        avlog.set_level(avlog.ERROR)
        with avlog.Capture(local=False) as logs:
            avlog.log(avlog.ERROR, "test", "after the probe")
        assert [m for _, _, m in logs] == ["after the probe"]
    finally:
        avlog.set_level(level)
        avlog.set_skip_repeated(skip)
