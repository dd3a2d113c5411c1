"""Build the tutorial notebooks from their sources in ``notebooks/src/``.

Each ``src/<name>.py`` is a notebook in the jupytext "percent" format (``# %%`` starts a
code cell, ``# %% [markdown]`` a markdown cell; its YAML header holds the notebook
metadata) and becomes ``<name>.ipynb`` here, stored without outputs. Edit the sources,
then run

    python notebooks/build.py            # rewrites notebooks/*.ipynb that changed
    python notebooks/build.py --check    # exit 1 if a notebook is out of date

``tests/test_notebooks.py`` checks that the stored notebooks match their sources and
runs every one of them in FAST mode (``BAYES_TRANSFER_FAST=1``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
FORMAT = "py:percent"   # explicit: the sources' commented magics would make a guess "hydrogen"
#: The repository's public address (GitHub OWNER/NAME), written wherever a source says
#: ``{REPOSITORY}`` (the Colab badges, the pip install cell). One place to change it;
#: ``bayes_transfer.hub.PUBLISH_BASE_URL`` (where the packed priors are published) names
#: the same home (tests/test_publish.py checks that they agree).
REPOSITORY = "OWNER/bayes_transfer"


def notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook written in ``source``, without outputs."""
    nb = jupytext.read(source, fmt=FORMAT)
    nb.metadata.pop("jupytext", None)         # how the source is written, not notebook data
    nb.nbformat, nb.nbformat_minor = 4, 5     # cell ids need nbformat 4.5
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{source.stem[:2]}-cell-{i:02d}"   # stable ids: rebuilding gives no diff
        cell["source"] = cell["source"].replace("{REPOSITORY}", REPOSITORY)
    nbformat.validate(nb)
    return nb


def build() -> dict[str, nbformat.NotebookNode]:
    """{file name: notebook} for every tutorial notebook, without outputs."""
    return {f"{source.stem}.ipynb": notebook(source) for source in sorted(SRC.glob("*.py"))}


def _normalised(nb) -> str:
    return nbformat.writes(nbformat.from_dict(nb))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the stored notebooks are up to date")
    args = parser.parse_args(argv)
    built = build()
    stale = [p.name for p in sorted(HERE.glob("*.ipynb")) if p.name not in built]
    if stale:
        print("no source in notebooks/src/ for:", ", ".join(stale))
    for file_name, nb in built.items():
        path = HERE / file_name
        if path.exists() and _normalised(nbformat.read(path, as_version=4)) == _normalised(nb):
            continue
        if args.check:
            stale.append(file_name)
            continue
        nbformat.write(nb, path)
        print("wrote", path)
    if args.check and stale:
        print("out of date (run python notebooks/build.py):", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
