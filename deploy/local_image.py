"""Build deploy/Dockerfile on this machine without a docker engine: a debootstrapped base and buildah.

    python deploy/local_image.py [--tag localhost/rnnserve:check] [--cache DIR] [--json FILE]

1. Base image: Debian bookworm `minbase` with python3, python3-venv and ca-certificates, debootstrapped from
   the Debian mirror apt already uses here (read from /etc/apt/sources.list*), imported with `podman import`.
   It stands in for the official `python:3.11-slim` base (the Dockerfile's default, unchanged): both are
   Debian bookworm with CPython 3.11. The root filesystem is cached as a tarball in the cache folder and the
   imported image stays in the local container storage, so only the first run pays for debootstrap.
   The base also trusts the CA certificates this machine added (/usr/local/share/ca-certificates), so the
   build's `pip install` reaches PyPI through the same TLS setup as the host's pip.
2. `buildah build --isolation chroot --layers --build-arg PYTHON_IMAGE=<base> -f deploy/Dockerfile .`: no
   daemon, no user namespaces; `--layers` keeps the dependency layer cached until pyproject.toml changes.

CONTAINERS_CONF points at a file in the cache folder with `default_ulimits = []` (the stock default asks for
ulimits a sandboxed root may not raise). Prints one line per step; `--json` writes what was built and how long
each step took, for tests/deploy/test_image.py.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
INCLUDE = ("python3", "python3-venv", "ca-certificates")
DEFAULT_TAG = "localhost/rnnserve:check"
DEFAULT_CACHE = Path(os.environ.get("RNNSERVE_IMAGE_CACHE", "/var/cache/rnnserve-image"))
EXTRA_CAS = "/usr/local/share/ca-certificates/*.crt"
TOOLS = ("buildah", "podman", "debootstrap")


@dataclass(frozen=True)
class ImageBuild:
    """What one run built and how long each step took (seconds)."""

    tag: str
    image_id: str
    size_bytes: int
    base: str
    base_size_bytes: int
    base_cached: bool
    base_seconds: float
    build_seconds: float
    mirror: str
    containers_conf: str


def _say(msg: str) -> None:
    print(f"[local_image] {msg}", flush=True)


def _deb822_mirror(text: str, suite: str) -> str | None:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        enabled = fields.get("enabled", "yes").lower() != "no"
        if enabled and "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
            if fields.get("uris"):
                return fields["uris"].split()[0]
    return None


def _one_line_mirror(text: str, suite: str) -> str | None:
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            return words[1]
    return None


def apt_mirror(sources: list[Path] | None = None, suite: str = SUITE) -> str:
    """Return the Debian mirror apt uses for `suite`, from sources.list (one-line) or *.sources (deb822)."""
    if sources is None:
        sources = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            found = _deb822_mirror(text, suite)
        elif path.suffix == ".list" or path.name == "sources.list":
            found = _one_line_mirror(text, suite)
        else:
            found = None
        if found:
            return found
    raise SystemExit(f"no Debian mirror for {suite} found in /etc/apt/sources.list*: pass --mirror URL")


def containers_conf(cache: Path) -> Path:
    """Write a containers.conf with no default ulimits and export it as CONTAINERS_CONF."""
    conf = cache / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    os.environ["CONTAINERS_CONF"] = str(conf)
    return conf


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(cmd, check=True, **kw)


def _image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0


def image_size(name: str) -> int:
    """Uncompressed size of a local image, bytes (as `podman images` reports it)."""
    out = _run(["podman", "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True)
    return int(out.stdout.strip())


def base_image(cache: Path, mirror: str) -> tuple[str, bool, float]:
    """Return (image name, was cached, seconds); debootstrap + import unless the image or tarball exists."""
    cas = sorted(glob.glob(EXTRA_CAS))
    key = hashlib.sha256(
        json.dumps([SUITE, INCLUDE, mirror, [Path(c).read_bytes().hex() for c in cas]]).encode()
    ).hexdigest()[:12]
    name = f"localhost/rnnserve-base:{SUITE}-{key}"
    tarball = cache / f"base-{SUITE}-{key}.tar"
    started = time.monotonic()
    if _image_exists(name):
        _say(f"base image {name}: cached in the container storage")
        return name, True, time.monotonic() - started
    cached = tarball.exists()
    if not cached:
        with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            _say(f"debootstrap --variant=minbase {SUITE} from {mirror} ...")
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(INCLUDE)}",
                    SUITE,
                    str(rootfs),
                    mirror,
                ],
                stdout=subprocess.DEVNULL,
            )
            for ca in cas:
                shutil.copy(ca, rootfs / "usr/local/share/ca-certificates")
            if cas:
                _run(["chroot", str(rootfs), "update-ca-certificates"], stdout=subprocess.DEVNULL)
            # The apt lists debootstrap leaves are not needed in the image (the official slim base has none).
            for lists in (rootfs / "var/lib/apt/lists").glob("*"):
                if lists.is_file():
                    lists.unlink()
            _run(["tar", "-C", str(rootfs), "-cf", f"{tarball}.part", "."])
            os.replace(f"{tarball}.part", tarball)
    _say(f"podman import {tarball.name} -> {name}")
    with tarball.open("rb") as f:
        _run(["podman", "import", "--quiet", "-", name], stdin=f, stdout=subprocess.DEVNULL)
    return name, cached, time.monotonic() - started


def build(tag: str, base: str) -> float:
    """Build deploy/Dockerfile with buildah on `base`; return the seconds it took."""
    started = time.monotonic()
    _say(f"buildah build -f deploy/Dockerfile --build-arg PYTHON_IMAGE={base} -t {tag} .")
    _run(
        [
            "buildah",
            "build",
            "--isolation",
            "chroot",
            "--layers",
            "--quiet",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "-f",
            "deploy/Dockerfile",
            "-t",
            tag,
            ".",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> ImageBuild:
    """Build the base (cached) and the image; print and optionally write a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default=DEFAULT_TAG)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="base rootfs cache folder")
    ap.add_argument("--mirror", default=None, help="Debian mirror (default: the one apt uses)")
    ap.add_argument("--json", type=Path, default=None, help="write the build summary here")
    args = ap.parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {' '.join(missing)} (apt-get install buildah podman debootstrap)")
    args.cache.mkdir(parents=True, exist_ok=True)
    conf = containers_conf(args.cache)
    mirror = args.mirror or apt_mirror()
    base, cached, base_s = base_image(args.cache, mirror)
    build_s = build(args.tag, base)
    out = _run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", args.tag], capture_output=True, text=True
    )
    result = ImageBuild(
        tag=args.tag,
        image_id=out.stdout.strip(),
        size_bytes=image_size(args.tag),
        base=base,
        base_size_bytes=image_size(base),
        base_cached=cached,
        base_seconds=round(base_s, 1),
        build_seconds=round(build_s, 1),
        mirror=mirror,
        containers_conf=str(conf),
    )
    _say(
        f"built {result.tag} ({result.size_bytes / 1e6:.0f} MB; base {result.base_size_bytes / 1e6:.0f} MB) "
        f"in {build_s:.0f} s after {base_s:.0f} s for the base"
    )
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
