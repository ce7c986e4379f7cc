"""`make dashboard` as a person uses it: the server on loopback, a real (headless) Chromium loads the
page, and the screenshot shows two runs' loss curves. Run with `make test-browser` (needs Debian's
chromium; not part of `make test`)."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env, write_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLORS = {"low-lr": (255, 0, 0), "high-lr": (0, 0, 255)}  # the dashboard's palette, in run order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test-browser installs Debian's)")
def test_dashboard_shows_two_runs_loss_curves_in_a_browser(make_config, tmp_path):
    from PIL import Image

    root = Path(make_config().log.output_root)
    for name, lr in (("low-lr", 1e-3), ("high-lr", 1e-2)):
        cfg = make_config(optim={"lr": lr}, train={"max_steps": 30, "log_every": 2}, log={"run_name": name})
        subprocess.run([sys.executable, "trainer/run.py", str(write_recipe(tmp_path / f"{name}.py", cfg))], cwd=REPO,
                       env=subprocess_env(), check=True, capture_output=True, timeout=300)
    port = free_port()
    palette = ",".join("#%02x%02x%02x" % rgb for rgb in COLORS.values())
    server = subprocess.Popen([sys.executable, "-m", "trainer.dashboard", "--runs", str(root), "--port", str(port)],
                              cwd=REPO, env={**subprocess_env(), "TRACKIO_COLOR_PALETTE": palette},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read() if server.poll() else "no server"
                time.sleep(0.5)
        screenshot = tmp_path / "dashboard.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000",
                        "--virtual-time-budget=40000", f"--screenshot={screenshot}",
                        f"http://127.0.0.1:{port}/?project=bert-mlm&metric_filter=train/loss"],
                       check=True, capture_output=True, timeout=180)
    finally:
        server.terminate()
        server.wait(timeout=30)
    import numpy as np

    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    chart = pixels[:, pixels.shape[1] // 4:]  # right of the sidebar, whose legend dots are small
    counts = {name: int((np.abs(chart - rgb).max(axis=-1) < 40).sum()) for name, rgb in COLORS.items()}
    print(f"screenshot {screenshot}: curve pixels per run {counts}")
    assert all(count > 200 for count in counts.values()), counts  # a drawn curve per run, not just a legend dot
