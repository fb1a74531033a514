"""Decoder routing by real capability: what goes to NVDEC, DALI's CPU decoder or PyAV, and why."""
import pytest

from dali_pipes import routing
from dali_pipes.routing import DALI_CPU, NVDEC, PYAV, route, video_format


def p(codec, pix_fmt="yuv420p", **kw):
    return {"codec": codec, "pix_fmt": pix_fmt, **kw}


@pytest.mark.parametrize("pix_fmt,want", [
    ("yuv420p", ("420", 8)), ("yuvj420p", ("420", 8)), ("nv12", ("420", 8)),
    ("yuv420p10le", ("420", 10)), ("p010le", ("420", 10)), ("yuv422p", ("422", 8)),
    ("yuvj422p", ("422", 8)), ("yuv444p", ("444", 8)), ("yuv444p12le", ("444", 12)),
    ("gray", ("400", 8)), ("gray10le", ("400", 10)), ("rgb24", ("rgb24", 8)),
])
def test_video_format_from_pixel_format(pix_fmt, want):
    assert video_format(p("h264", pix_fmt))[1:] == want


@pytest.mark.parametrize("probe,device,nvdec,want", [
    # DALI 2.4's CPU decoder: VP8, VP9, MJPEG only
    (p("vp9"), "cpu", None, DALI_CPU),
    (p("mjpeg", "yuvj422p"), "cpu", None, DALI_CPU),
    (p("h264"), "cpu", None, PYAV),
    (p("vp9", "yuv420p10le"), "cpu", None, PYAV),
    # the GPU decoder: no MJPEG whatever the docstring says
    (p("mjpeg", "yuvj420p"), "mixed", None, PYAV),
    (p("h264"), "mixed", None, NVDEC),
    (p("mpeg4"), "mixed", None, NVDEC),
    (p("prores", "yuv422p10le"), "mixed", None, PYAV),
    # NVDEC decodes no H.264 4:4:4 or 10-bit before Blackwell; HEVC 10-bit unverified with DALI
    (p("h264", "yuv444p"), "mixed", routing.NVDEC_BY_ARCH["hopper"], PYAV),
    (p("h264", "yuv420p10le"), "mixed", routing.NVDEC_BY_ARCH["hopper"], PYAV),
    (p("hevc", "yuv420p10le"), "mixed", routing.NVDEC_BY_ARCH["hopper"], PYAV),
    (p("hevc"), "mixed", routing.NVDEC_BY_ARCH["hopper"], NVDEC),
    # AV1: not on Hopper, A100 or Volta; on Ada
    (p("av1"), "mixed", routing.NVDEC_BY_ARCH["hopper"], PYAV),
    (p("av1"), "mixed", routing.NVDEC_BY_ARCH["ampere"], PYAV),
    (p("av1"), "mixed", routing.NVDEC_BY_ARCH["ada"], NVDEC),
    # what the driver answers wins over the tables
    (p("vp9"), "mixed", frozenset({("h264", "420", 8)}), PYAV),
    # display rotation and a later stream: PyAV turns frames upright / picks the stream
    (p("vp9", rotation=90), "cpu", None, PYAV),
    (p("h264", rotation=180), "mixed", None, PYAV),
    (p("vp9", stream_index=1, video_streams=[{"index": 0}, {"index": 1}]), "cpu", None, PYAV),
    (p("vp9", stream_index=1, video_streams=[{"index": 1}]), "cpu", None, DALI_CPU),
])
def test_routes(probe, device, nvdec, want):
    got, reason = route(probe, device, nvdec)
    assert got == want, reason
    assert reason


def test_reasons_name_the_cause():
    assert route(p("av1"), "mixed", routing.NVDEC_BY_ARCH["hopper"])[1] == \
        "av1 4:2:0 8-bit: not decoded by this GPU's NVDEC"
    assert "DALI NVDEC output unverified" in route(p("hevc", "yuv420p10le"), "mixed",
                                                   routing.NVDEC_BY_ARCH["hopper"])[1]
    assert route(p("mjpeg"), "mixed")[1] == "mjpeg: not in DALI's GPU decoder"
    assert route(p("vp9", rotation=270), "cpu")[1] == "rotation 270"


def test_arch_of_compute_capability():
    assert [routing.arch_of(*cc) for cc in ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0))] == \
        ["volta", "turing", "ampere", "ampere", "ada", "hopper", "blackwell"]


def test_summary_counts_routes_and_reasons():
    s = routing.summarize([route(p("h264"), "cpu"), route(p("vp9"), "cpu"),
                           route(p("vp9", rotation=90), "cpu"), route(p("vp8"), "cpu")])
    assert s["summary"] == {NVDEC: 0, DALI_CPU: 2, PYAV: 2}
    assert s["reasons"][PYAV] == {"h264: not in DALI's CPU decoder": 1, "rotation 90": 1}
    assert s["reasons"][DALI_CPU] == {"vp9": 1, "vp8": 1}


def test_sizes_outside_the_drivers_limits_go_to_pyav():
    """The driver's answer carries NVDEC's size range per format (cuvidGetDecoderCaps)."""
    limits = {("hevc", "420", 8): (144, 144, 8192, 8192)}
    small = p("hevc", width=128, height=96)
    assert route(small, "mixed", limits) == (PYAV, "128x96: outside this GPU's NVDEC sizes for "
                                                   "hevc (144x144 to 8192x8192)")
    assert route(p("hevc", width=640, height=360), "mixed", limits)[0] == NVDEC
