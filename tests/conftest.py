"""Shared fixtures: a synthetic CRDS cache and synthetic uncal exposures.

CRDS environment handling (no monkeypatch: the fixtures are session-scoped):

* ``crds`` reads CRDS_SERVER_URL once, when it is first imported — and asdf/stpipe
  plug-ins may import it early.  So this module sets CRDS_SERVER_URL to the serverless
  URL at conftest import time, i.e. before any test module (or crds) is imported; crds
  then never opens a socket.
* CRDS_PATH is read by crds on every call, so the ``crds_cache`` fixture sets it when the
  session cache is built (and ``build_crds_cache`` drops crds' in-process mapping/config
  caches).  It stays set for the rest of the session; tests that need another cache must
  set it themselves and call ``calstream.steps.synth.crds_cache.clear_crds_caches()``.
* CRDS_CONTEXT is NOT set: tests pin contexts with ``context=`` (or set it locally).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CRDS_SERVER_URL", "https://crds-serverless-mode.stsci.edu")
os.environ.setdefault("CRDS_OBSERVATORY", "jwst")

#: What the session cache holds: SUB160 and SUB640 subarray-sized references for NRCA1
#: and NRCB1 (contexts jwst_0001 and jwst_0002).
CACHE_DETECTORS = ("NRCA1", "NRCB1")
CACHE_SUBARRAYS = ("SUB160", "SUB640")


@pytest.fixture(scope="session")
def crds_cache(tmp_path_factory):
    """Session CRDS cache (CrdsCacheInfo); sets os.environ['CRDS_PATH'] to its root."""
    from calstream.steps.synth.crds_cache import build_crds_cache

    root = tmp_path_factory.mktemp("crds_cache")
    os.environ["CRDS_PATH"] = str(root)
    return build_crds_cache(root, detectors=CACHE_DETECTORS, subarrays=CACHE_SUBARRAYS)


@pytest.fixture(scope="session")
def sub160_observation(crds_cache, tmp_path_factory):
    """ObservationInfo of one NRCA1 SUB160 RAPID 1x10 exposure (with ASDF extension)."""
    from calstream.steps.synth import generate_observation

    out = tmp_path_factory.mktemp("sub160")
    return generate_observation(out, crds_cache.root, detectors=("NRCA1",), subarray="SUB160",
                                readpatt="RAPID", ngroups=10, nints=1, seed=0)


@pytest.fixture(scope="session")
def sub160_uncal(sub160_observation):
    """Path of the NRCA1 SUB160 uncal file."""
    return sub160_observation.uncal_paths[0]


@pytest.fixture(scope="session")
def image3_field(crds_cache, tmp_path_factory):
    """FieldInfo of a calibrated SUB160 dithered field for calwebb_image3 (synth.field: 4 NRCA1
    exposures, the 2-group ones keep their cosmic rays through stage 1; 100x the default cosmic-ray
    rate so a 160x160 window gets some), each run through calwebb_detector1 and calwebb_image2 into
    the association's folder."""
    from calstream.steps.detector1 import calibrate_file
    from calstream.steps.image2 import calibrate_rate_file
    from calstream.steps.synth.exposures import NoiseParams
    from calstream.steps.synth.field import generate_field

    out = tmp_path_factory.mktemp("image3_field")
    info = generate_field(out, crds_cache.root, subarray="SUB160", seed=1, noise=NoiseParams(cr_rate=5e-3))
    for uncal in info.uncal_paths:
        rate = calibrate_file(uncal, out, context=info.context).products["rate"]
        calibrate_rate_file(rate, out, context=info.context)
    return info
