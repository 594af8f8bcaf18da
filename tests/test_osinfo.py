"""--os-variant against the real osinfo database (osinfo-db, as virt-install reads it)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tdxvirt.errors import InputError
from tdxvirt.guest.osinfo import DEFAULT_OS, os_id


def test_known_short_ids_give_libosinfos_ids():
    assert os_id("ubuntu22.04") == "http://ubuntu.com/ubuntu/22.04"
    assert os_id("debianbullseye") == os_id("debian11")
    assert os_id("debian11").endswith("/debian/11")
    assert os_id("linux2022") == DEFAULT_OS  # the default is in the database too


@pytest.mark.parametrize("short_id, says", [
    ("ubuntu99.04", "unknown --os-variant 'ubuntu99.04': this machine's osinfo database"),
    ("Ubuntu 22.04", "invalid --os-variant 'Ubuntu 22.04'"),
    ("../../etc/passwd", "invalid --os-variant"),
    ("", "invalid --os-variant"),
])
def test_bad_short_ids_are_one_line(short_id, says):
    with pytest.raises(InputError) as error:
        os_id(short_id)
    assert str(error.value).startswith(says) and "\n" not in str(error.value)


def test_no_database_names_the_package(tmp_path):
    with pytest.raises(InputError, match=r"apt install osinfo-db"):
        os_id("linux2022", databases=(str(tmp_path),))


@given(st.text(max_size=80))
def test_any_text_is_an_id_or_one_line(text):
    try:
        found = os_id(text)
    except InputError as error:
        assert "\n" not in str(error)
    else:
        assert found.startswith("http")
