"""The batch report rendered in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from medgen.batch.driver import run_batch
from tests.test_batch import make_archive, write_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Rows(HTMLParser):
    """Counts body rows of the table with id 'studies' and whether the page fetches anything."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = self.in_body = False
        self.rows = 0
        self.remote: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "studies":
            self.in_table = True
        elif tag == "tbody" and self.in_table:
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows += 1
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//")):
                self.remote.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = self.in_body = False


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    make_archive(tmp / "archive", n_good=4)
    summary = run_batch(write_pipeline(tmp / "p.yaml"), tmp / "archive", tmp / "out", workers=2,
                        track=False, progress=False)
    return summary


def test_report_is_self_contained_with_one_row_per_study(report):
    parser = _Rows()
    parser.feed(report.report.read_text())
    assert parser.rows == report.total == 5
    assert parser.remote == []


def test_montages_show_input_output_difference_at_256_px_or_more(report):
    from PIL import Image

    pictures = sorted(report.out.glob("studies/*/*_montage.png"))
    assert len(pictures) == 4
    with Image.open(pictures[0]) as img:
        width, height = img.size
    # three columns of views, each view at least 256 px on its shorter side
    assert width >= 3 * 256 and height >= 3 * 256


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,1600", f"--screenshot={shot}", report.report.as_uri()],
                   capture_output=True, timeout=90, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1280)
    assert pixels.std() > 20  # text, table and montages, not a blank page
    assert (pixels < 64).mean() > 0.01  # dark montage panels are on screen
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          report.report.as_uri()], capture_output=True, text=True, timeout=90).stdout
    parser = _Rows()
    parser.feed(dom)  # the table as the browser built it
    assert parser.rows == report.total
