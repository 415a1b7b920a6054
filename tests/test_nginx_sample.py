"""config/nginx-cluster.example.conf: nginx accepts it, and it keeps what docs/deploy-cluster.md says."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "config" / "nginx-cluster.example.conf"


def test_nginx_accepts_the_sample(tmp_path: Path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    # The sample is a conf.d file: wrap it in the http block of a minimal main config.
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  include {SAMPLE};\n}}\n"
    )
    result = subprocess.run([nginx, "-t", "-c", str(main), "-p", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_the_sample_streams_and_fails_over_as_documented():
    text = SAMPLE.read_text()
    directives = {m[1]: m[2] for m in re.finditer(r"^\s*(\w+)\s+([^;#]*);", text, re.MULTILINE)}
    assert directives["proxy_buffering"] == "off"
    assert directives["proxy_http_version"] == "1.1"
    assert directives["proxy_next_upstream"].split() == ["error", "http_503", "non_idempotent"]
    assert len(re.findall(r"^\s*server 127\.0\.0\.1:\d+", text, re.MULTILINE)) == 3
    assert SAMPLE.name in (ROOT / "docs" / "deploy-cluster.md").read_text()
