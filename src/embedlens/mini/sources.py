"""Real captioned object images for training embedlens-mini v2, fetched only when retraining.

Two pinned packages, each fetched with its ordinary client, verified by sha256 and unpacked
into a cache under ``resources/`` (gitignored; ``make run`` never fetches them):

* Debian ``tuxpaint-stamps-default`` 2022.06.04-1 (``apt-get download``): ~800 PNG stamps,
  mostly photo cut-outs of animals, food, vehicles and household objects, each with an
  English caption sentence (first line of the stamp's ``.txt``). **GPL-2** (or later).
* npm ``emoji-datasource-google`` 16.0.0 (``npm pack``): Noto emoji, 64 px PNG, with names
  and categories. Images **Apache-2.0** (Noto Emoji); the package's metadata MIT.

The catalogue (`load_catalogue`) is a list of `ObjectImage`: an RGBA cut-out (transparent
background), a short noun-phrase name, a caption sentence, a category, the source and its
licence. Names are cleaned from file names (stamps) or the Unicode name (emoji); rules below.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .wheels import MiniBuildError, _log, sha256_file


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    key: str  # "stamps" | "emoji"
    client: str  # "apt" | "npm"
    package: str
    version: str
    file_name: str  # what the client writes
    sha256: str  # of that file
    license: str
    license_note: str


SOURCES: dict[str, SourceSpec] = {
    "stamps": SourceSpec(
        key="stamps", client="apt", package="tuxpaint-stamps-default", version="2022.06.04-1",
        file_name="tuxpaint-stamps-default_2022.06.04-1_all.deb",
        sha256="6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
        license="GPL-2.0-or-later",
        license_note="Tux Paint stamps, (c) 2002-2022 Bill Kendrick and contributors (debian/copyright)"),
    "emoji": SourceSpec(
        key="emoji", client="npm", package="emoji-datasource-google", version="16.0.0",
        file_name="emoji-datasource-google-16.0.0.tgz",
        sha256="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
        license="Apache-2.0 (Noto Emoji images); MIT (emoji-data metadata)",
        license_note="Google Noto Emoji v2.048 images via emoji-datasource-google (iamcal/emoji-data)"),
}

DEFAULT_CACHE = Path("resources/mini-data")
#: emoji categories of concrete things (faces, people, flags, symbols left out: their names
#: are hard to tell apart at 64 px or are not objects)
EMOJI_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Activities", "Objects")
#: stamp folders left out: letters, digits, money and operators (text, not objects)
STAMP_SKIP = ("symbols/alphabets", "symbols/math", "symbols/money")


@dataclasses.dataclass(frozen=True)
class ObjectImage:
    """One real object: RGBA cut-out file, short name, caption, category, source."""

    object_id: str  # "<source>:<relative path>"
    path: Path  # RGBA PNG in the cache
    name: str  # short noun phrase, lower case ("tennis ball")
    caption: str  # a human-written sentence (stamps) or "A <name>." (emoji)
    category: str  # e.g. "mammals", "food-fruit"
    source: str  # "stamps" | "emoji"


def _fetch(spec: SourceSpec, downloads: Path) -> Path:
    """The package file of ``spec`` in ``downloads`` (fetched when absent), sha256-verified.

    Raises:
        MiniBuildError: the client is missing or fails, or the checksum differs.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / spec.file_name
    if not target.is_file():
        if spec.client == "apt":
            cmd = ["apt-get", "download", f"{spec.package}={spec.version}"]
        else:
            cmd = ["npm", "pack", f"{spec.package}@{spec.version}", "--silent"]
        exe = shutil.which(cmd[0])
        if exe is None:
            raise MiniBuildError(f"{spec.key}: `{cmd[0]}` is not installed; fetch {spec.file_name} by hand "
                                 f"into {downloads}/ (sha256 {spec.sha256})")
        _log(f"fetching {spec.package} {spec.version} with {cmd[0]}")
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=1800)
            got = Path(tmp) / spec.file_name
            if proc.returncode != 0 or not got.is_file():
                raise MiniBuildError(f"{spec.key}: `{' '.join(cmd)}` failed (run `apt-get update` first "
                                     f"for apt); or put {spec.file_name} into {downloads}/ by hand:\n"
                                     f"{proc.stderr.strip()[-1500:]}")
            got.replace(target)
    digest = sha256_file(target)
    if digest != spec.sha256:
        raise MiniBuildError(f"{spec.key}: {target} has sha256 {digest}, expected {spec.sha256}; "
                             "delete the file and fetch again")
    return target


def _split_words(stem: str) -> str:
    s = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)  # chineseJunk -> chinese Junk
    s = re.sub(r"[_\-]+", " ", s)
    s = re.sub(r"\b(mirror|left|right|\d+)\b", " ", s, flags=re.IGNORECASE)
    s = re.sub(r"\d+", " ", s)
    s = re.sub(r"\s[a-z]\b", " ", s.lower())  # variant suffixes ("note_a", "fireman_b")
    return re.sub(r"\s+", " ", s).strip().lower()


def stamp_name(rel: str) -> str:
    """Short name of a stamp from its path (``animals/mammals/bovines/bison.png`` → "bison",
    ``vehicles/ship/chineseJunk.png`` → "chinese junk", ``frog-1.png`` → "frog")."""
    return _split_words(Path(rel).stem)


def emoji_name(entry: dict) -> str:
    """Short name of an emoji from its Unicode name, lower case, without a trailing " face"
    for animals ("DOG FACE" → "dog")."""
    name = str(entry.get("name") or entry.get("short_name") or "").lower()
    if entry.get("category") == "Animals & Nature" and name.endswith(" face"):
        name = name[: -len(" face")]
    return re.sub(r"\s+", " ", name).strip()


def _unpack_stamps(deb: Path, out: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        root = Path(tmp) / "usr/share/tuxpaint/stamps"
        rows = []
        for png in sorted(root.rglob("*.png")):
            rel = png.relative_to(root).as_posix()
            txt = png.with_suffix(".txt")
            if rel.startswith(STAMP_SKIP) or not txt.is_file():
                continue
            name = stamp_name(rel)
            caption = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
            if len(name) < 3 or not caption:
                continue
            dst = out / "stamps" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dst)
            rows.append({"object_id": f"stamps:{rel}", "path": f"stamps/{rel}", "name": name,
                         "caption": caption, "category": Path(rel).parts[1] if len(Path(rel).parts) > 2
                         else Path(rel).parts[0], "source": "stamps"})
    return rows


def _unpack_emoji(tgz: Path, out: Path) -> list[dict]:
    with tarfile.open(tgz) as tf:
        meta = json.load(tf.extractfile("package/emoji.json"))
        rows = []
        for e in sorted(meta, key=lambda e: e["sort_order"]):
            if not e.get("has_img_google") or e.get("category") not in EMOJI_CATEGORIES:
                continue
            member = f"package/img/google/64/{e['image']}"
            try:
                data = tf.extractfile(member).read()
            except (KeyError, AttributeError):
                continue
            dst = out / "emoji" / e["image"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            name = emoji_name(e)
            rows.append({"object_id": f"emoji:{e['image']}", "path": f"emoji/{e['image']}", "name": name,
                         "caption": f"{name[0].upper()}{name[1:]}.", "category": e["subcategory"],
                         "source": "emoji"})
    return rows


def fetch_sources(cache: Path | str = DEFAULT_CACHE, keys: tuple[str, ...] = ("stamps", "emoji")) -> Path:
    """Fetch, verify and unpack the pinned sources into ``cache`` (skipped when
    ``cache/objects/catalogue.json`` exists for the same pins). Returns the objects folder.

    Raises:
        MiniBuildError: a client is missing or fails, or a checksum differs.
    """
    cache = Path(cache)
    objects = cache / "objects"
    manifest = objects / "catalogue.json"
    pins = {k: dataclasses.asdict(SOURCES[k]) for k in keys}
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if have.get("pins") == pins:
            return objects
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="objects.tmp-", dir=cache))
    try:
        rows: list[dict] = []
        for k in keys:
            f = _fetch(SOURCES[k], cache / "downloads")
            rows += _unpack_stamps(f, tmp) if k == "stamps" else _unpack_emoji(f, tmp)
        (tmp / "catalogue.json").write_text(json.dumps({"pins": pins, "objects": rows}, indent=0))
        if objects.exists():
            shutil.rmtree(objects)
        tmp.rename(objects)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"{len(rows)} objects in {objects}/")
    return objects


def load_catalogue(objects_dir: Path | str) -> list[ObjectImage]:
    """The objects of an unpacked cache (`fetch_sources`), in a fixed order.

    Raises:
        FileNotFoundError: ``objects_dir/catalogue.json`` is missing (run `fetch_sources`).
    """
    objects_dir = Path(objects_dir)
    manifest = objects_dir / "catalogue.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: fetch the training objects first "
                                "(embedlens.mini.sources.fetch_sources)")
    rows = json.loads(manifest.read_text())["objects"]
    return [ObjectImage(r["object_id"], objects_dir / r["path"], r["name"], r["caption"], r["category"],
                        r["source"]) for r in rows]
