"""The fleet load test, lean: three example registries on one fake-gcs-server bucket."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_fleet import run_load

pytestmark = [pytest.mark.usefixtures("nix"), pytest.mark.slow]


def test_three_registries_realise_each_image_once_and_pack_each_layer_once(
    tmp_path: Path,
) -> None:
    """12 concurrent pulls of 2 new images over 3 registry processes sharing only a bucket:
    one Nix realisation per image, one pack per distinct layer, one digest per image."""
    report = run_load(tmp_path, images=2, requests=12, concurrency=6, seed=7)
    assert all(answer.status == 200 for answer in report.answers)
    assert report.consistent
    assert len({a.registry for a in report.answers}) == 3
    assert list(report.realisations.values()) == [1, 1]
    assert report.packed
    assert set(report.packed.values()) == {1}
    assert report.cached_latencies  # some requests came after their image was built
