"""Admission at the ingress: a bounded number of requests and a bounded amount of work in progress per ingress
replica, the work weighted by what a request asks for (serve_app/admission.py). Unit tests of the arithmetic and
the bookkeeping, then the wiring through the real FastAPI app (a backend that runs nothing)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from lightray.contracts import DenoiseParams
from recording_backend import RecordingBackend
from serve_app.admission import AdmissionLimit, TenantQuota, pixel_work, request_work
from serve_app.api import create_app
from serve_app.backend import StepUpdate
from serve_app.errors import ServiceUnavailable, TenantOverQuota, http_status
from serve_app.settings import ServiceSettings


def params(n=1, steps=8, size=1024, cfg=1.0, strength=1.0) -> DenoiseParams:
    return DenoiseParams(seeds=tuple(range(n)), width=size, height=size, num_inference_steps=steps,
                         true_cfg_scale=cfg, strength=strength)


def test_work_is_steps_times_images_times_cfg_rows_times_megapixels():
    assert request_work(params()) == 8  # Lightning 8 steps, one 1024² image: 8 row-steps at 1024²
    assert request_work(params(steps=50, cfg=4.0)) == 100  # base: true CFG doubles the rows
    assert request_work(params(n=4, steps=50, cfg=4.0, size=1536)) == 50 * 2 * 4 * 2.25
    assert request_work(params(size=512)) == 2  # a quarter of the pixels
    # Image inputs run only `strength` of the schedule (diffusers' get_timesteps): 0.5 of 8 steps is 4.
    assert request_work(params(strength=0.5)) == 4


def test_requests_beyond_the_count_bound_get_503_and_their_slots_come_back():
    limit = AdmissionLimit(2)
    with limit.slot(), limit.slot():
        with pytest.raises(ServiceUnavailable, match="2 requests in progress") as refused:
            with limit.slot():
                pass
        assert refused.value.retry_after_s == 2 and limit.in_progress == 2
    assert limit.in_progress == 0
    with limit.slot():  # free again
        assert limit.in_progress == 1


def test_work_beyond_the_bound_gets_503_while_cheaper_work_still_fits():
    limit = AdmissionLimit(10, max_work=100)
    with limit.slot() as base:
        base.charge(request_work(params(steps=50, cfg=4.0)))  # 100: the whole bound
        assert limit.work_in_progress == 100
        with pytest.raises(ServiceUnavailable, match="100 of 100 units of work in progress, this request needs 8"):
            with limit.slot() as lightning:
                lightning.charge(8)
        assert limit.in_progress == 1  # the refused request's slot was given back with its 503
    with limit.slot() as a, limit.slot() as b:
        a.charge(60)
        b.charge(40)  # fits exactly
        assert limit.work_in_progress == 100
    assert limit.work_in_progress == 0 and limit.in_progress == 0


def test_a_request_heavier_than_the_whole_bound_runs_alone_rather_than_never():
    limit = AdmissionLimit(10, max_work=100)
    with limit.slot() as huge:
        huge.charge(900)  # nothing else in progress: admitted
        with pytest.raises(ServiceUnavailable):
            with limit.slot() as small:
                small.charge(1)
    assert limit.work_in_progress == 0


def test_work_is_released_when_the_request_fails_and_charges_add_up():
    limit = AdmissionLimit(10, max_work=100)
    with pytest.raises(asyncio.TimeoutError):
        with limit.slot() as admission:
            admission.charge(70)
            raise asyncio.TimeoutError  # e.g. the 504 path
    assert limit.work_in_progress == 0 and limit.in_progress == 0
    with limit.slot() as admission:  # an edit: its uploads' decoding, then its denoising
        admission.charge(10)
        admission.charge(95)  # past the bound, but only this request holds work: it runs alone
        assert admission.work == limit.work_in_progress == 105
    assert limit.work_in_progress == 0


def test_without_a_work_bound_only_the_count_bounds_admission():
    limit = AdmissionLimit(1)
    with limit.slot() as admission:
        admission.charge(10**9)
        assert limit.work_in_progress == 10**9


GEN = {"prompt": "a red circle on the left, white background", "size": "64x64", "num_inference_steps": 4,
       "model": "lightray-shapes-lightning-4"}


@pytest.fixture()
def weighted_app(preset, registry_root, tmp_path):
    """The real app with a work bound of 1 unit (the embedded model's requests are tiny: 64² × 4 steps is
    0.0156 units) over a backend that runs nothing."""
    settings = ServiceSettings(preset=preset.model_dump(), registry=str(registry_root), auth_enabled=False,
                               max_admitted_work=1.0, image_store_dir=str(tmp_path))
    with TestClient(create_app(RecordingBackend(preset), settings), base_url="http://localhost") as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_the_routes_charge_each_request_its_work(weighted_app, path):
    admission = weighted_app.app.state.admission
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(image, format="PNG")
    body = {**GEN, **({"image": base64.b64encode(image.getvalue()).decode(), "strength": 1.0}
                      if path.endswith("edits") else {})}
    work = request_work(params(steps=4, size=64))
    if path.endswith("edits"):
        work += pixel_work(64 * 64)  # decoding the upload at the ingress
    # Other requests hold all but less than this one's work: 503 in the service's error format, at once.
    admission.work_in_progress = 1.0 - work / 2
    r = weighted_app.post(path, json=body)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "2" and "units of work in progress" in r.json()["error"]["message"]
    # With room for exactly its work it runs, and its charge is given back afterwards.
    admission.work_in_progress = 1.0 - work
    r = weighted_app.post(path, json=body)
    assert r.status_code == 200, r.text
    assert admission.work_in_progress == pytest.approx(1.0 - work) and admission.in_progress == 0


class HeldStream(RecordingBackend):
    """Streams one progress event, then holds the stream (and so its admission slot) until `release` is set."""

    def __init__(self, preset):
        super().__init__(preset)
        self.release = threading.Event()

    async def generate_stream(self, spec):
        yield StepUpdate(1, 2)
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        yield self._answer(spec)


def test_a_stream_holds_its_admission_slot_until_it_ends(preset, tmp_path):
    """A streamed request keeps its slot while its events flow (FastAPI >= 0.118 runs a `yield` dependency's exit
    after the response is sent, which pyproject requires), and gives it back when the stream ends."""
    settings = ServiceSettings(preset=preset.model_dump(), auth_enabled=False, max_concurrent_requests=1,
                               registry=str(tmp_path / "registry"), image_store_dir=str(tmp_path / "images"))
    backend = HeldStream(preset)
    body = {"prompt": "a red circle", "size": "64x64"}
    with TestClient(create_app(backend, settings), base_url="http://localhost") as client:
        admission = client.app.state.admission
        with client.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert any("lightray.progress" in line for line in lines if line.startswith("data:"))
            assert admission.in_progress == 1
            refused = client.post("/v1/images/generations", json=body)  # the one slot is the stream's
            assert refused.status_code == 503
            backend.release.set()
            assert any("image_generation.completed" in line for line in lines)
        assert admission.in_progress == 0
        assert client.post("/v1/images/generations", json=body).status_code == 200


# ------------------------------------------------------------------------------------------- tenant quotas


def test_a_tenant_at_its_own_request_bound_gets_429_while_others_are_admitted():
    limit = AdmissionLimit(10)
    flood, other = TenantQuota("flood", 2, None), TenantQuota("other", 2, None)
    with limit.slot(flood), limit.slot(flood):
        with pytest.raises(TenantOverQuota, match="'flood' is at its bound max_concurrent_requests = 2") as refused:
            with limit.slot(flood):
                pass
        assert (http_status(refused.value), refused.value.param, refused.value.retry_after_s) == (
            429, "max_concurrent_requests", 2)
        with limit.slot(other):  # the ingress has room, and the other tenant has its own bound
            assert limit.in_progress == 3 and limit.tenants["other"].requests == 1
        assert limit.tenants["flood"].requests == 2
    assert limit.in_progress == 0 and limit.tenants == {}  # every count given back, no entry left behind
    with limit.slot(flood):
        pass


def test_a_tenant_over_its_own_work_bound_gets_429_and_its_work_comes_back():
    limit = AdmissionLimit(10, max_work=100)
    flood = TenantQuota("flood", 10, 50)
    with limit.slot(flood) as a:
        a.charge(40)
        with pytest.raises(TenantOverQuota, match="max_admitted_work = 50 .40 units of work in progress, this "
                                                  "request needs 20") as refused:
            with limit.slot(flood) as b:
                b.charge(20)
        assert refused.value.param == "max_admitted_work"
        with limit.slot(TenantQuota("other", 10, 50)) as c:
            c.charge(50)  # the other tenant's own 50 fits, and the ingress's 100 too
            assert limit.work_in_progress == 90 and limit.tenants["flood"].work == 40
        with limit.slot(flood) as d:
            d.charge(10)  # exactly its bound
    assert limit.work_in_progress == 0 and limit.tenants == {}
    with limit.slot(flood) as alone:
        alone.charge(80)  # heavier than its bound but nothing else of its own charged: runs alone
    # The ingress's bound is still the ingress's: 503 when the service, not the tenant, is full.
    with limit.slot(TenantQuota("a", 10, 100)) as a, limit.slot(TenantQuota("b", 10, 100)) as b:
        a.charge(90)
        with pytest.raises(ServiceUnavailable):
            b.charge(20)


def test_quotas_default_to_the_tenant_share_of_the_ingress_and_keys_may_set_their_own():
    settings = ServiceSettings(max_concurrent_requests=32, max_admitted_work=100.0, api_keys=[
        {"tenant": "acme", "key": "k" * 16},
        {"tenant": "globex", "key": "g" * 16, "max_concurrent_requests": 3, "max_admitted_work": 7.5}])
    acme, globex = (TenantQuota.of_key(k, settings) for k in settings.api_keys)
    assert (acme.max_requests, acme.max_work) == (16, 50.0)  # tenant_share 0.5 of each bound
    assert (globex.max_requests, globex.max_work) == (3, 7.5)
    unweighted = ServiceSettings(max_concurrent_requests=3, api_keys=[{"tenant": "acme", "key": "k" * 16}])
    only = TenantQuota.of_key(unweighted.api_keys[0], unweighted)
    assert (only.max_requests, only.max_work) == (2, None)  # rounded up; no work bound when the service has none


def test_key_settings_refuse_bad_bounds_naming_the_field():
    for bad, field in [({"max_concurrent_requests": 0}, "max_concurrent_requests"),
                       ({"max_admitted_work": -1}, "max_admitted_work"),
                       ({"priority": "interactive", "max_priority": "batch"}, "max_priority"),
                       ({"max_priority": "urgent"}, "max_priority")]:
        with pytest.raises(ValidationError, match=field):
            ServiceSettings(api_keys=[{"tenant": "acme", "key": "k" * 16, **bad}])
    with pytest.raises(ValidationError, match="tenant_share"):
        ServiceSettings(auth_enabled=False, tenant_share=1.5)


FLOOD_KEY, OTHER_KEY = "sk-flood-0123456789abcdef", "sk-other-0123456789abcdef"


def test_through_the_app_a_flooding_tenant_gets_429s_and_the_other_tenant_still_gets_in(preset, tmp_path):
    """One tenant's held streams fill its share of the ingress (429 naming the bound, Retry-After) and no more: the
    other tenant's requests are still admitted. Without tenant quotas the flood took every slot (503 for all)."""
    settings = ServiceSettings(preset=preset.model_dump(), max_concurrent_requests=4, tenant_share=0.5,
                               registry=str(tmp_path / "registry"), image_store_dir=str(tmp_path / "images"),
                               api_keys=[{"tenant": "flood", "key": FLOOD_KEY}, {"tenant": "other", "key": OTHER_KEY}])
    backend = HeldStream(preset)
    body = {"prompt": "a red circle", "size": "64x64"}
    flood = {"Authorization": f"Bearer {FLOOD_KEY}"}
    with TestClient(create_app(backend, settings)) as client:
        admission = client.app.state.admission
        with client.stream("POST", "/v1/images/generations", json={**body, "stream": True}, headers=flood) as s1, \
                client.stream("POST", "/v1/images/generations", json={**body, "stream": True}, headers=flood) as s2:
            streams = [s1.iter_lines(), s2.iter_lines()]
            for lines in streams:
                assert any("lightray.progress" in line for line in lines if line.startswith("data:"))
            assert admission.tenants["flood"].requests == 2
            refused = client.post("/v1/images/generations", json=body, headers=flood)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["param"] == "max_concurrent_requests" and error["code"] == "rate_limit_exceeded"
            assert "max_concurrent_requests = 2" in error["message"] and refused.headers["retry-after"] == "2"
            other = client.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"})
            assert other.status_code == 200, other.text
            backend.release.set()
            for lines in streams:
                assert any("image_generation.completed" in line for line in lines)
        assert admission.in_progress == 0 and admission.tenants == {}
