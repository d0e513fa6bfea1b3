#!/usr/bin/env python3
"""Fetch the benchmark corpora from the package registries, cached between runs.

Corpora (docs/benchmarks.md, Targets, names them M and L):

* ``django`` (medium, ~10k entries): the Django 5.1.4 sdist from PyPI, fetched with
  ``pip download --no-deps --no-binary :all: django==5.1.4``;
* ``linux`` (large, ~84k entries, ~1.3 GB): Debian's ``linux-source-6.1`` package, fetched with
  ``apt-get download``; the inner ``/usr/src/linux-source-6.1.tar.xz`` is extracted;
* ``synthetic`` (tiny, for smoke mode): generated here, deterministic for a given size.

Everything lives under ``$CASCOWFS_BENCH_DATA`` (default ``<repo>/bench-data``, gitignored)::

    downloads/            the registry artefacts (sdist, .deb)
    corpora/<name>/tree/  the extracted tree (top-level directory of the archive stripped)
    corpora/<name>/info.json   entries, files, bytes, source, when

A corpus counts as cached when its ``info.json`` exists; ``--force`` fetches again.

Usage::

    .venv/bin/python tools/fetch_corpus.py django            # prints the tree path
    .venv/bin/python tools/fetch_corpus.py linux             # ~150 MB download, 1.3 GB tree
    .venv/bin/python tools/fetch_corpus.py synthetic --files 200
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DJANGO_VERSION = "5.1.4"
LINUX_PACKAGE = "linux-source-6.1"


def data_dir() -> Path:
    return Path(os.environ.get("CASCOWFS_BENCH_DATA") or REPO / "bench-data").absolute()


def corpus_dir(name: str) -> Path:
    return data_dir() / "corpora" / name


def _log(msg: str) -> None:
    print(f"[fetch_corpus] {msg}", file=sys.stderr, flush=True)


def tree_stats(root: Path) -> dict:
    """Entries (everything below root), regular files, directories, symlinks, bytes."""
    entries = files = dirs = links = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, n))
            if os.path.islink(os.path.join(dirpath, n)):
                links += 1
            else:
                files += 1
                size += st.st_size
        entries += len(dirnames) + len(filenames)
    return {"entries": entries, "files": files, "dirs": dirs, "symlinks": links, "bytes": size}


def _finish(name: str, tree: Path, source: str, extra: dict | None = None) -> Path:
    info = {"name": name, "source": source, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tree": str(tree), **tree_stats(tree), **(extra or {})}
    (tree.parent / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    _log(f"{name}: {info['entries']} entries, {info['files']} files, "
         f"{info['bytes'] / 1e6:.1f} MB at {tree}")
    return tree


def _cached(name: str, force: bool) -> Path | None:
    d = corpus_dir(name)
    if (d / "info.json").exists() and (d / "tree").is_dir() and not force:
        return d / "tree"
    if d.exists():
        shutil.rmtree(d)
    return None


def _extract_tar(archive: Path, dest_parent: Path) -> Path:
    """Extract archive into dest_parent/tree, stripping its single top-level directory."""
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=dest_parent))
    subprocess.run(["tar", "-xf", str(archive), "-C", str(tmp), "--no-same-owner"], check=True)
    top = list(tmp.iterdir())
    src = top[0] if len(top) == 1 and top[0].is_dir() else tmp
    tree = dest_parent / "tree"
    os.rename(src, tree)
    shutil.rmtree(tmp, ignore_errors=True)
    return tree


def fetch_django(force: bool = False) -> Path:
    if (t := _cached("django", force)) is not None:
        return t
    dl = data_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    pattern = str(dl / f"[Dd]jango-{DJANGO_VERSION}.tar.gz")
    if not glob.glob(pattern):
        _log(f"pip download django=={DJANGO_VERSION} (sdist)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"django=={DJANGO_VERSION}", "-d", str(dl)], check=True,
                       stdout=sys.stderr)
    sdist = Path(glob.glob(pattern)[0])
    d = corpus_dir("django")
    d.mkdir(parents=True, exist_ok=True)
    tree = _extract_tar(sdist, d)
    return _finish("django", tree, f"PyPI sdist {sdist.name} (pip download --no-binary :all:)")


def fetch_linux(force: bool = False) -> Path:
    if (t := _cached("linux", force)) is not None:
        return t
    dl = data_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    debs = sorted(glob.glob(str(dl / f"{LINUX_PACKAGE}_*.deb")))
    if not debs:
        _log(f"apt-get download {LINUX_PACKAGE}")
        # apt-get download runs as the _apt user when it can; let it write into dl.
        subprocess.run(["apt-get", "download", "-q", LINUX_PACKAGE], cwd=dl, check=True,
                       stdout=sys.stderr)
        debs = sorted(glob.glob(str(dl / f"{LINUX_PACKAGE}_*.deb")))
    deb = Path(debs[-1])
    d = corpus_dir("linux")
    d.mkdir(parents=True, exist_ok=True)
    unpack = Path(tempfile.mkdtemp(prefix="deb-", dir=d))
    try:
        _log(f"dpkg-deb -x {deb.name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpack)], check=True)
        inner = sorted(glob.glob(str(unpack / "usr/src" / f"{LINUX_PACKAGE}.tar.*")))
        if not inner:
            raise SystemExit(f"no usr/src/{LINUX_PACKAGE}.tar.* inside {deb}")
        _log(f"extracting {Path(inner[0]).name}")
        tree = _extract_tar(Path(inner[0]), d)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
    return _finish("linux", tree, f"Debian package {deb.name} (apt-get download), inner "
                   f"{LINUX_PACKAGE}.tar.xz")


_WORDS = ("alpha beta gamma delta state branch commit tree node value result agent search "
          "reward policy rollout cache layer chunk index").split()


def _source_text(rng: random.Random, lines: int) -> str:
    out = [f'"""Synthetic module {rng.randrange(10**6)}."""', ""]
    for i in range(lines):
        a, b = rng.choice(_WORDS), rng.choice(_WORDS)
        out.append(f"def {a}_{b}_{i}(x):\n    return x * {rng.randrange(1000)} + len('{b}')\n")
    return "\n".join(out) + "\n"


def make_synthetic(dest: Path | None = None, files: int = 200, seed: int = 7,
                   force: bool = False) -> Path:
    """A small deterministic source-like tree: nested packages of .py files, a few text and
    binary files, a symlink and a hard link. ``dest`` (if given) is the tree directory itself."""
    name = f"synthetic-{files}"
    if dest is None:
        if (t := _cached(name, force)) is not None:
            return t
        d = corpus_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        tree = d / "tree"
    else:
        tree = Path(dest)
        if tree.exists():
            shutil.rmtree(tree)
    rng = random.Random(seed)
    tree.mkdir(parents=True)
    made = 0
    pkgs = [tree / "pkg"]
    while made < files:
        base = rng.choice(pkgs)
        if len(pkgs) < max(2, files // 12) and rng.random() < 0.25:
            sub = base / f"sub{len(pkgs)}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / "__init__.py").write_text("")
            pkgs.append(sub)
            made += 1
            continue
        base.mkdir(parents=True, exist_ok=True)
        kind = rng.random()
        if kind < 0.8:
            p = base / f"mod{made}.py"
            p.write_text(_source_text(rng, rng.randrange(5, 60)))
        elif kind < 0.95:
            p = base / f"notes{made}.txt"
            p.write_text(" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(20, 400))))
        else:
            p = base / f"blob{made}.bin"
            p.write_bytes(rng.randbytes(rng.randrange(1024, 64 * 1024)))
        made += 1
    (tree / "README").write_text("synthetic corpus for cascowfs benchmark smoke runs\n")
    os.symlink("README", tree / "README.link")
    os.link(tree / "README", tree / "README.hard")
    if dest is None:
        return _finish(name, tree, f"synthetic (seed {seed}, {files} files)")
    return tree


def fetch(name: str, force: bool = False, files: int = 200) -> Path:
    if name in ("django", "M", "medium"):
        return fetch_django(force)
    if name in ("linux", "L", "large"):
        return fetch_linux(force)
    if name.startswith("synthetic"):
        return make_synthetic(files=files, force=force)
    raise SystemExit(f"unknown corpus {name!r} (django, linux, synthetic)")


def info(name: str) -> dict:
    return json.loads((corpus_dir(name) / "info.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="+", help="django | linux | synthetic")
    ap.add_argument("--force", action="store_true", help="fetch/extract again")
    ap.add_argument("--files", type=int, default=200, help="synthetic: number of files")
    args = ap.parse_args(argv)
    for name in args.corpus:
        print(fetch(name, args.force, args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
