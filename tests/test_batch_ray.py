"""The Ray executor against a real local Ray (``ray.init(num_cpus=2)``): same results as local."""

from __future__ import annotations

import shutil

import pytest

from medgen.archive.ledger import Ledger
from medgen.batch.driver import run_batch
from tests.test_batch import STAGES, check_consistent, make_archive, write_pipeline

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'medgen[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_gives_the_same_outputs_and_ledger_as_local(local_ray, tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n_good=4)
    pipeline = write_pipeline(tmp_path / "p.yaml", dicom=True)
    local = run_batch(pipeline, src, tmp_path / "local", workers=2, track=False, progress=False)
    (tmp_path / "ray").mkdir()  # the same pseudonym key: the same study keys and UIDs
    shutil.copy(tmp_path / "local" / "pseudonym.key", tmp_path / "ray" / "pseudonym.key")
    remote = run_batch(pipeline, src, tmp_path / "ray", workers=2, executor="ray", track=False, progress=False)
    assert (remote.done_now, remote.failed_now) == (local.done_now, local.failed_now) == (4, 1)
    check_consistent(tmp_path / "ray", 4)

    def outputs(out):
        with Ledger.open(out) as ledger:
            return {(s.study_key, st.stage, st.status): sorted((n, h) for n, _, h in st.outputs)
                    for s in ledger.studies(STAGES) for st in s.steps}

    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")  # byte for byte
    again = run_batch(pipeline, src, tmp_path / "ray", workers=2, executor="ray", track=False, progress=False)
    assert again.done_now == 0 and again.done_before == 4
