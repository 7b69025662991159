"""jwst association files: round trip, errors naming the file, compatibility with jwst, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calstream.daemon.cli import main
from calstream.steps.asn import Association, Member, asn_from_list, load_association, write_association
from calstream.steps.errors import InputError


def _touch(folder: Path, *names: str) -> list[Path]:
    paths = [folder / n for n in names]
    for p in paths:
        p.write_bytes(b"")
    return paths


def test_round_trip_resolves_members_next_to_the_association(tmp_path):
    asn = asn_from_list(["a_cal.fits", "b_cal.fits"], "mosaic", asn_id="a3002")
    path = write_association(asn, tmp_path / "mosaic_asn.json")
    loaded = load_association(path)
    assert loaded == Association(asn_id="a3002", asn_type="image3", asn_rule="DMS_Level3_Base",
                                 product_name="mosaic",
                                 members=(Member("a_cal.fits", "science"), Member("b_cal.fits", "science")),
                                 path=path, program="noprogram")
    assert loaded.member_paths() == [tmp_path / "a_cal.fits", tmp_path / "b_cal.fits"]
    assert [p.name for p in tmp_path.iterdir()] == ["mosaic_asn.json"]  # no temporary left behind


def test_layout_matches_jwst_asn_from_list():
    asn = asn_from_list([Path("x_cal.fits")], "prod")
    assert list(asn) == ["asn_type", "asn_rule", "version_id", "code_version", "degraded_status", "program",
                         "constraints", "asn_id", "target", "asn_pool", "products"]
    assert asn["asn_id"] == "a3001" and asn["asn_pool"] == "none" and asn["version_id"] is None
    assert asn["products"] == [{"name": "prod", "members": [{"expname": "x_cal.fits", "exptype": "science"}]}]


def test_science_filters_other_exptypes_and_absolute_names_stay(tmp_path):
    data = asn_from_list(["/abs/a_cal.fits", "sky_cal.fits"], "p")
    data["products"][0]["members"][1]["exptype"] = "background"
    loaded = load_association(write_association(data, tmp_path / "p_asn.json"))
    assert loaded.science() == (Member("/abs/a_cal.fits", "science"),)
    assert loaded.member_paths()[0] == Path("/abs/a_cal.fits")


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"asn_type": "image3"}', "no 'products' key"),
    ('{"products": []}', "non-empty list"),
    ('{"products": [{"name": "a", "members": [{"expname": "x", "exptype": "science"}]},'
     ' {"name": "b", "members": [{"expname": "y", "exptype": "science"}]}]}', "2 products"),
    ('{"products": [{"members": [{"expname": "x", "exptype": "science"}]}]}', "no 'name'"),
    ('{"products": [{"name": "a"}]}', "no 'members' key"),
    ('{"products": [{"name": "a", "members": []}]}', "has no members"),
    ('{"products": [{"name": "a", "members": [{"expname": "x"}]}]}', "no 'exptype'"),
    ('{"asn_id": 5, "products": [{"name": "a", "members": [{"expname": "x", "exptype": "science"}]}]}',
     "'asn_id' must be a string"),
    ('{"products": [{"name": "../../elsewhere", "members": [{"expname": "x", "exptype": "science"}]}]}',
     "not a plain file name"),
    ('{"asn_id": "..", "products": [{"name": "a", "members": [{"expname": "x", "exptype": "science"}]}]}',
     "asn_id '..' is not a plain file name"),
])
def test_malformed_association_names_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad_asn.json"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as info:
        load_association(path)
    assert info.value.path == str(path)


def test_missing_association_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_association(tmp_path / "nope_asn.json")


def test_write_refuses_an_invalid_association(tmp_path):
    with pytest.raises(InputError, match="no members"):
        write_association({"products": [{"name": "a", "members": []}]}, tmp_path / "x_asn.json")
    assert not list(tmp_path.iterdir())


def test_jwst_reads_what_we_write(tmp_path):
    load_asn = pytest.importorskip("jwst.associations").load_asn
    path = write_association(asn_from_list(["a_cal.fits", "b_cal.fits"], "mosaic"), tmp_path / "m_asn.json")
    with path.open() as stream:
        theirs = load_asn(stream)
    assert theirs["asn_type"] == "image3" and theirs["asn_rule"] == "DMS_Level3_Base"
    assert theirs["products"][0]["name"] == "mosaic"
    assert [m["expname"] for m in theirs["products"][0]["members"]] == ["a_cal.fits", "b_cal.fits"]


def test_we_read_what_jwst_writes(tmp_path):
    jwst_list = pytest.importorskip("jwst.associations.asn_from_list")
    _touch(tmp_path, "a_cal.fits", "b_cal.fits")
    out = tmp_path / "j_asn.json"
    jwst_list.Main.cli(["-o", str(out), "--product-name", "jmosaic", "a_cal.fits", "b_cal.fits"])
    loaded = load_association(out)
    assert loaded.product_name == "jmosaic" and loaded.asn_rule == "DMS_Level3_Base"
    assert loaded.asn_id == "a3001"
    assert loaded.science() == (Member("a_cal.fits", "science"), Member("b_cal.fits", "science"))


def test_cli_asn_make_writes_members_relative_to_the_association(tmp_path, capsys):
    files = _touch(tmp_path, "a_cal.fits", "b_cal.fits")
    out = tmp_path / "sub" / "m_asn.json"
    out.parent.mkdir()
    code = main(["asn", "make", "-o", str(out), "--product-name", "mosaic", *map(str, files)])
    assert code == 0, capsys.readouterr().err
    loaded = load_association(out)
    assert loaded.asn_type == "image3"
    assert [p.resolve() for p in loaded.member_paths()] == [f.resolve() for f in files]
    assert json.loads(out.read_text())["products"][0]["members"][0]["expname"] == "../a_cal.fits"


def test_cli_asn_make_rejects_missing_members(tmp_path, capsys):
    code = main(["asn", "make", "-o", str(tmp_path / "m_asn.json"), "--product-name", "m",
                 str(tmp_path / "absent_cal.fits")])
    assert code == 3
    assert "absent_cal.fits" in capsys.readouterr().err
    assert not (tmp_path / "m_asn.json").exists()
