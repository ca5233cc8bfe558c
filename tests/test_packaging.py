"""A built wheel (not an editable install) carries the model cards and runs the CLI.

The wheel goes into a throwaway venv that sees this interpreter's site-packages (torch and
the other dependencies) through a ``.pth`` file, not through ``system_site_packages``: inside
a virtualenv the base interpreter's site-packages lack them. Path lines in a ``.pth`` file are
not site directories, so the editable install of the checkout stays invisible there.
"""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_cards_and_cli(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("prisma_mm-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(purelib) / "_outer_site.pth").write_text("\n".join(outer) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import prisma_mm; print(prisma_mm.__file__); "
            "print(len(prisma_mm.list_models())); print(prisma_mm.load_model('tiny-clip', None).n_layers)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    location, count, layers = probe.stdout.split()
    assert location.startswith(str(env_dir)), location
    n_cards = sum(1 for _ in __import__("prisma_mm").list_models())
    assert int(count) == n_cards and int(layers) == 2
    listing = subprocess.run(
        [str(env_dir / "bin" / "prisma-mm"), "zoo", "list", "--family", "open_clip"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "tiny-clip" in listing.stdout and "tiny-vit" not in listing.stdout
