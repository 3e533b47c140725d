"""Damaged records the loaders must refuse as bad records rather than load wrongly or crash on: NaN or wrongly typed
boxes and image sizes (RefCOCO, Visual Genome), JSONL lines that are not UTF-8 (a byte-order mark is allowed)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("box,width,height,message", [
    ([float("nan"), 10, 40, 30], 100, 100, "4 finite numbers"),
    ([0, 10, float("inf"), 30], 100, 100, "4 finite numbers"),
    ([0, 10, 40, 30], "100", 100, "width must be a positive number"),
    ([0, 10, 40, 30], 100, float("nan"), "height must be a positive number"),
    ([0, 10, 40, 30], [100], 100, "width must be a positive number"),
])
def test_box_checks_refuse_nan_and_wrongly_typed_sizes(box, width, height, message):
    """A damaged annotation (NaN parses as JSON; a width as a string) is a bad record, not a clamped full-width box
    or a TypeError."""
    from tinygpt.data.bad_records import BadRecord
    from tinygpt.data.formats.refcoco import check_box_xywh
    with pytest.raises(BadRecord, match=message):
        check_box_xywh(box, width, height)
    assert check_box_xywh([0, 10, 40, 30], 100, 100) == (0.0, 10.0, 40.0, 40.0)


def test_jsonl_lines_that_are_not_utf8_are_bad_records_and_a_bom_is_allowed(tmp_path, caplog):
    """A Latin-1 line used to load with U+FFFD in place of its letters, silently; a UTF-8 byte-order mark at the start
    of the file used to make line 1 a bad record."""
    from tinygpt.data.bad_records import BadRecordCounter
    from tinygpt.data.formats.base import iter_jsonl
    path = tmp_path / "mixed.jsonl"
    path.write_bytes('\ufeff{"a": "caf\u00e9"}\n'.encode("utf-8") + '{"a": "caf\u00e9"}\n'.encode("latin-1")
                     + b'{"a": "ok"}\n')
    counter = BadRecordCounter(str(path))
    rows = list(iter_jsonl(path, counter))
    assert [(where.rsplit(":", 1)[1], obj) for where, obj in rows] == [("1", {"a": "caf\u00e9"}), ("3", {"a": "ok"})]
    assert counter.bad == 1 and "not UTF-8 text" in caplog.text
