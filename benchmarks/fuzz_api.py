"""Fuzz the images API from its own OpenAPI schema with schemathesis (v4): positive cases (schema-valid) and
negative ones (schema-violating) for every operation, each response checked by schemathesis's checks.

    python benchmarks/fuzz_api.py --url http://127.0.0.1:8000 [--max-examples 40] [--seed 1]
    python benchmarks/fuzz_api.py --local-cluster [--max-examples 40]   # deploys configs/serve/local.yaml first

What must hold (docs/fuzzing.md): no 5xx (`not_a_server_error`); status code, content type, headers and body of
every response as the schema declares them (`*_conformance`; the schema declares each route's error responses
and the `x-request-id` header); every schema-violating request answered with a 4xx (`negative_data_rejection`).
`positive_data_acceptance` is left out: the schema cannot say "a decodable PNG" or "multiples of 16 within the
model's limits", so some schema-valid requests rightly get 400.

Cost bound: a schema-valid request may ask for 10 images of 256x256 at 100 steps with CFG (minutes on a CPU).
Cases whose generation would cost more than `--budget` 64x64-image-steps are filtered out of the generated
stream (a Hypothesis filter; the checks are unchanged). `tests/test_fuzz_api.py` runs the same harness against
the in-process ASGI app in `make test`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

from lightray.config import ModelPreset, load_preset  # noqa: E402

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def generation_cost(case, preset: ModelPreset) -> float:
    """Upper bound of what `case` would cost the denoiser if the service accepted it, in 64x64-image-steps
    (x2 with true CFG). A request the service rejects costs nothing; over-estimating only filters more."""
    body = case.body if isinstance(case.body, dict) else {}
    n = max(1, min(_int(body.get("n"), 1), preset.max_images_per_request))
    model = body.get("model") if isinstance(body.get("model"), str) else None
    quality = body.get("quality") if isinstance(body.get("quality"), str) else None
    try:  # without a model, `quality` picks the variant (ModelPreset.quality_variants)
        variant = preset.variant(model) if model is not None else preset.variant_for_quality(quality)
    except KeyError:
        variant = max(preset.variants, key=lambda v: v.num_inference_steps)
    steps = max(1, min(_int(body.get("num_inference_steps"), variant.num_inference_steps), preset.max_inference_steps))
    width, height = preset.default_size
    m = _SIZE.match(body["size"]) if isinstance(body.get("size"), str) else None
    if m:
        width, height = int(m.group(1)), int(m.group(2))
    elif body.get("image") is not None:  # edits: the output may take the input's size
        width, height = preset.largest_size
    pixels = min(width * height, preset.largest_size[0] * preset.largest_size[1])
    try:
        cfg = float(body.get("true_cfg_scale", variant.true_cfg_scale) or 1)
    except (TypeError, ValueError):
        cfg = variant.true_cfg_scale
    return n * steps * pixels / (64 * 64) * (2 if cfg > 1 else 1)


@dataclasses.dataclass
class FuzzReport:
    cases: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """(operation, mode) → cases sent."""
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """(operation, status code) → responses."""
    failures: dict = dataclasses.field(default_factory=dict)
    """(operation, mode, failure title) → {"count", "message", "reproduce"} (the first case that showed it)."""
    unsatisfiable: list = dataclasses.field(default_factory=list)
    """(operation, mode) pairs with nothing to generate (e.g. negative cases of an operation without inputs)."""
    generator_errors: list = dataclasses.field(default_factory=list)
    """(operation, mode, error) where schemathesis itself failed to generate a case (its bug, not the API's); the
    rest of that operation and mode is not run."""
    seconds: float = 0.0

    @property
    def total_cases(self) -> int:
        return sum(self.cases.values())

    def summary(self) -> dict:
        return {
            "operations": len({op for op, _ in self.cases} | {op for op, _ in self.unsatisfiable}),
            "cases": self.total_cases,
            "cases_by_operation": {f"{op} [{mode}]": n for (op, mode), n in sorted(self.cases.items())},
            "statuses": {f"{op} {code}": n for (op, code), n in sorted(self.statuses.items(), key=str)},
            "no_cases": [f"{op} [{mode}]" for op, mode in self.unsatisfiable],
            "generator_errors": [f"{op} [{mode}]: {err}" for op, mode, err in self.generator_errors],
            "failures": [{"operation": op, "mode": mode, "check": title, **info}
                         for (op, mode, title), info in sorted(self.failures.items())],
            "seconds": round(self.seconds, 1),
        }


def fuzz(schema, preset: ModelPreset, *, max_examples: int = 25, budget: float = 32.0, base_url: str | None = None,
         derandomize: bool = True, headers: dict[str, str] | None = None, log=print) -> FuzzReport:
    """Every operation of `schema` (a schemathesis OpenAPI schema), positive and negative cases, `max_examples`
    each; failures are collected (first case of each kind kept for reproduction), not raised. `headers` go with
    every request (e.g. an API key)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    report = FuzzReport()
    start = time.time()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = operation.label
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode).filter(
                lambda case: generation_cost(case, preset) <= budget)

            @given(case=strategy)
            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                report.cases[(label, str(mode))] += 1
                try:
                    response = case.call_and_validate(base_url=base_url, headers=headers,
                                                      excluded_checks=[positive_data_acceptance])
                    report.statuses[(label, response.status_code)] += 1
                except (Exception, BaseExceptionGroup) as err:  # schemathesis's FailureGroup is a BaseExceptionGroup
                    for failure in getattr(err, "exceptions", [err]):
                        title = getattr(failure, "title", type(failure).__name__)
                        key = (label, str(mode), title)
                        if key not in report.failures:
                            report.failures[key] = {"count": 0, "message": str(failure)[:600],
                                                    "reproduce": case.as_curl_command()[:2000]}
                            log(f"FAIL {label} [{mode}] {title}: {str(failure)[:300]}")
                        report.failures[key]["count"] += 1
                    status = getattr(getattr(err, "response", None), "status_code", None)
                    report.statuses[(label, status or "error")] += 1

            try:
                run()
            except Unsatisfiable:
                report.unsatisfiable.append((label, str(mode)))
            except Exception as err:  # noqa: BLE001 - raised while generating: `run` itself never raises
                report.generator_errors.append((label, str(mode), f"{type(err).__name__}: {err}"[:300]))
                log(f"schemathesis could not generate a case for {label} [{mode}]: {type(err).__name__}: {err}")
            log(f"{label} [{mode}]: {report.cases[(label, str(mode))]} cases")
    report.seconds = time.time() - start
    return report


def main(argv: list[str] | None = None) -> int:
    import schemathesis

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running service (its /openapi.json is fuzzed)")
    where.add_argument("--local-cluster", action="store_true",
                       help="start a private Ray cluster, deploy configs/serve/local.yaml, fuzz it, stop it")
    p.add_argument("--preset", default="lightray-shapes", help="the served model preset (for the cost bound)")
    p.add_argument("--max-examples", type=int, default=40, help="cases per operation and mode")
    p.add_argument("--budget", type=float, default=32.0, help="largest generation tried, in 64x64-image-steps")
    p.add_argument("--random", action="store_true", help="new random cases each run (default: derandomized)")
    p.add_argument("--out", type=Path, help="write the JSON summary here")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="sent with every request (repeatable), e.g. 'Authorization: Bearer <key>'")
    p.add_argument("--metrics-sample", type=Path,
                   help="with --local-cluster: write the node's lightray_* metrics after the run here")
    p.add_argument("--log-sample", type=Path,
                   help="with --local-cluster: send one request with X-Request-Id: log-sample-1 after the run and "
                        "write the Serve log lines that carry it here")
    args = p.parse_args(argv)
    preset = load_preset(args.preset)

    cluster = None
    url = args.url
    if args.local_cluster:
        import tempfile

        from testing.local_cluster import RayCluster

        cluster = RayCluster(metrics_report_interval_ms=1000).start()
        registry = tempfile.mkdtemp(prefix="lightray-fuzz-registry-")
        images = tempfile.mkdtemp(prefix="lightray-fuzz-images-")
        cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml",
                                            {"registry": registry, "image_store_dir": images}))
        url = cluster.http_url
    try:
        schema = schemathesis.openapi.from_url(f"{url.rstrip('/')}/openapi.json")
        headers = dict((k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in args.header))
        report = fuzz(schema, preset, max_examples=args.max_examples, budget=args.budget, base_url=url,
                      derandomize=not args.random, headers=headers or None)
        summary = {"url": url, **report.summary()}
        if cluster is not None and args.log_sample:
            import httpx

            httpx.post(f"{url}/v1/images/generations", headers={"X-Request-Id": "log-sample-1"}, timeout=120,
                       json={"prompt": "a red circle on the left, white background", "n": 2, "seed": 1})
            time.sleep(2)
            args.log_sample.write_text("".join(
                f"{f.name}: {line}\n" for f in sorted(cluster.serve_log_dir.glob("*.log"))
                for line in f.read_text(errors="replace").splitlines() if "log-sample-1" in line))
        if cluster is not None and args.metrics_sample:
            import httpx

            time.sleep(3)  # one more metrics report
            text = httpx.get(cluster.metrics_url, timeout=10).text
            args.metrics_sample.write_text("\n".join(
                line for line in text.splitlines() if "lightray_" in line) + "\n")
    finally:
        if cluster is not None:
            cluster.stop()
    print(json.dumps({k: v for k, v in summary.items() if k != "statuses"}, indent=1, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
