"""The operator's decoder of kopf's watch streams: what kopf hands the handlers is the API
server's event, without managedFields, and kopf still decodes where the decoder is put."""

from __future__ import annotations

import inspect
import json

import pytest

from visionr1_operator import watch_stream

POD_EVENT = {
    "type": "MODIFIED",
    "object": {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "r-synthesis-0-abc",
            "namespace": "team-a",
            "labels": {"visionr1.io/run": "r"},
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {}}
            ],
            "resourceVersion": "42",
        },
        "spec": {"containers": [{"name": "stage", "env": [{"name": "A", "value": "é"}]}]},
        "status": {"phase": "Running"},
    },
}


def test_an_event_decodes_as_the_standard_library_does_less_managed_fields() -> None:
    line = json.dumps(POD_EVENT, ensure_ascii=False).encode()
    expected = json.loads(line)
    del expected["object"]["metadata"]["managedFields"]
    assert watch_stream.decode_event(line) == expected
    assert watch_stream.decode_event(line.decode()) == expected


@pytest.mark.parametrize(
    "event",
    [
        {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "7"}}},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}},
        {"type": "ADDED", "object": {"kind": "Pod", "metadata": None}},
        [1, 2],
    ],
)
def test_events_without_managed_fields_pass_unchanged(event: object) -> None:
    assert watch_stream.decode_event(json.dumps(event)) == event


def test_bad_json_raises_a_value_error_as_json_loads_does() -> None:
    # kopf's watch treats a decode failure like json's (ValueError): orjson's error is one
    with pytest.raises(ValueError):
        watch_stream.decode_event(b'{"type": "ADDED", "object": {')


def test_install_puts_the_decoder_where_kopfs_stream_decodes() -> None:
    import kopf._cogs.clients.api as kopf_api

    before = kopf_api.json
    try:
        kopf_api.json = json
        assert watch_stream.install() is True
        assert watch_stream.install() is True  # twice: still the one decoder
        assert kopf_api.json.loads is watch_stream.decode_event
        assert kopf_api.json.dumps is json.dumps  # the rest of json stays
        # kopf's stream decodes its lines with that module's json.loads: if a kopf release
        # decodes elsewhere, installing changes nothing and this fails first
        source = inspect.getsource(kopf_api.stream)
        assert "json.loads(line" in source
    finally:
        kopf_api.json = before


def test_install_leaves_a_kopf_that_decodes_otherwise_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import kopf._cogs.clients.api as kopf_api

    before = kopf_api.json
    try:
        kopf_api.json = object()  # a kopf whose stream no longer uses json.loads
        assert watch_stream.install() is False
        assert "keeping its decoder" in caplog.text
    finally:
        kopf_api.json = before
