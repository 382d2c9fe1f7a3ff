"""The wheels a lent GPU machine lacks, for bench/device.sh to install there.

    python bench/device_wheels.py          # into .whl/ (ignored); `make device-wheels`
    python bench/device_wheels.py --python 3.11 --dest /tmp/whl311   # to try them here

The device machine has Python 3.12, PyTorch and the scientific stack (numpy, pandas, pyarrow,
scipy, scikit-learn, matplotlib, pillow), but no MLflow, and no registry to install from.
This walks the installed dependency tree of what the stages import there (MLflow, timm and
the rest of pyproject's runtime list, DVC aside: the checks run the stages directly), drops
what the machine already has, and downloads the rest at the versions installed here (those
of constraints.txt), built for CPython 3.12 on x86-64 Linux. Carried, they must stay under
the device's 64 MiB for the whole working tree; the script prints the total.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".whl"
# What the stages import on the device, DVC left out (bench/device.sh runs them directly).
ROOTS = ("mlflow", "timm", "huggingface_hub", "safetensors", "pyyaml", "tqdm", "psutil")
# Already on the device's image (the device tool's KINDS.md) and too big to carry: their
# wheels alone would pass 64 MiB. The rest is carried even where the image has it, so the
# device runs the versions tested here.
ON_DEVICE = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*|numpy|pandas|pyarrow|scipy|"
                       r"scikit-learn|matplotlib|contourpy|fonttools|kiwisolver|pillow|sympy|"
                       r"networkx|mpmath|setuptools|psutil|pyyaml")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_24_x86_64")
LIMIT_MB = 55  # leaves room for the repository itself in the 64 MiB that travel


def normal(name: str) -> str:
    """A distribution's name as PyPI compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """{name: installed version} of roots and everything they require, extras left out."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normal(todo.pop())
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def download(pins: list[str], python: str, dest: Path) -> None:
    """pip download the pins, without their dependencies, for CPython `python` on x86-64 Linux."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    *platforms, "--dest", str(dest), *pins], check=True)


def main() -> None:
    """Download the missing wheels into .whl/ and print what they are and weigh."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the device's Python version")
    parser.add_argument("--dest", type=Path, default=FOLDER, help="folder (emptied first)")
    args = parser.parse_args()
    carried = {name: version for name, version in closure(ROOTS).items()
               if not ON_DEVICE.fullmatch(name)}
    shutil.rmtree(args.dest, ignore_errors=True)
    download([f"{name}=={version}" for name, version in sorted(carried.items())], args.python,
             args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2 ** 20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.dest}/: "
          + ", ".join(sorted(carried)))
    if total > LIMIT_MB:
        sys.exit(f"{total:.1f} MiB is over the {LIMIT_MB} MiB the device check can carry: "
                 "add the biggest ones the machine has to ON_DEVICE in bench/device_wheels.py")


if __name__ == "__main__":
    main()
