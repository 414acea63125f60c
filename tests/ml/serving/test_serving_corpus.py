"""The mesh checks on the team's real corpus: no real mesh is refused, every empty one is.

    .venv/bin/python -m pytest tests/ml/serving/test_serving_corpus.py -q      (skips without ../shared/corpus)
"""

from __future__ import annotations

import csv

import pytest

from ml.serving.config import LimitsConfig
from ml.serving.validation import RequestError, decode_mesh


def test_corpus_meshes_accepted_or_refused_with_a_4xx(corpus_dir):
    limits = LimitsConfig()
    rows = list(csv.DictReader((corpus_dir / "manifest.csv").open()))
    assert rows
    accepted = refused = 0
    for row in rows:
        data = (corpus_dir / row["file"]).read_bytes()
        faces = int(row["faces"] or 0)
        try:
            mesh = decode_mesh(data, limits)
        except RequestError as e:
            assert 400 <= e.status < 500 and e.field == "coarse_mesh"
            # Only meshes that are empty or too small to enclose anything may be refused.
            assert faces < limits.min_mesh_faces, (row["file"], faces, e.code, e.message)
            refused += 1
            continue
        assert faces >= limits.min_mesh_faces, (row["file"], faces)
        # Same triangle count as the manifest's (pymeshlab-triangulated) one: nothing dropped or split twice.
        assert len(mesh.faces) == faces, (row["file"], len(mesh.faces), faces)
        accepted += 1
    assert accepted > 200 and refused >= 1, (accepted, refused)
