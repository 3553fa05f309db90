"""Prometheus metrics for the gateway, kept in plain dicts and rendered as text (no client library needed).

Series (prefix ``clinic_edge_gateway_``): ``requests_total{route,status}``, ``rejections_total{reason}``,
``inflight_requests``, ``waiting_requests``, ``upstream_healthy{upstream}``, ``upstream_inflight{upstream}``,
``ttfb_seconds`` and ``duration_seconds`` histograms (chat route), ``images_total`` and ``image_bytes_total``,
``dicom_images_total`` and the ``dicom_conversion_seconds`` histogram (DICOM images converted to PNG).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable

__all__ = ["Histogram", "Metrics"]

PREFIX = "clinic_edge_gateway_"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """A cumulative histogram with fixed buckets (seconds)."""

    def __init__(self, buckets: tuple[float, ...] = _BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> Iterable[str]:
        """Prometheus text lines for this histogram."""
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            yield f'{name}_bucket{{le="{bound}"}} {cumulative}'
        yield f'{name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count {self.count}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The gateway's counters; gauges are read at render time through callables."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.rejections: defaultdict[str, int] = defaultdict(int)
        self.ttfb = Histogram()
        self.duration = Histogram()
        self.images = 0
        self.image_bytes = 0
        self.dicom_images = 0
        self.dicom_conversion = Histogram()
        self.gauges: dict[str, Callable[[], float]] = {}
        self.labelled_gauges: dict[str, Callable[[], dict[str, float]]] = {}

    def render(self) -> str:
        """The ``/metrics`` body."""
        out = [f"# TYPE {PREFIX}requests_total counter"]
        out += [
            f'{PREFIX}requests_total{{route="{_label(r)}",status="{s}"}} {n}' for (r, s), n in self.requests.items()
        ]
        out.append(f"# TYPE {PREFIX}rejections_total counter")
        out += [f'{PREFIX}rejections_total{{reason="{_label(r)}"}} {n}' for r, n in self.rejections.items()]
        out += [f"# TYPE {PREFIX}images_total counter", f"{PREFIX}images_total {self.images}"]
        out += [f"# TYPE {PREFIX}image_bytes_total counter", f"{PREFIX}image_bytes_total {self.image_bytes}"]
        out += [f"# TYPE {PREFIX}dicom_images_total counter", f"{PREFIX}dicom_images_total {self.dicom_images}"]
        for name, read in self.gauges.items():
            out += [f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name} {read()}"]
        for name, read_all in self.labelled_gauges.items():
            out.append(f"# TYPE {PREFIX}{name} gauge")
            out += [f'{PREFIX}{name}{{upstream="{_label(u)}"}} {v}' for u, v in read_all().items()]
        out.append(f"# TYPE {PREFIX}ttfb_seconds histogram")
        out += self.ttfb.render(PREFIX + "ttfb_seconds")
        out.append(f"# TYPE {PREFIX}duration_seconds histogram")
        out += self.duration.render(PREFIX + "duration_seconds")
        out.append(f"# TYPE {PREFIX}dicom_conversion_seconds histogram")
        out += self.dicom_conversion.render(PREFIX + "dicom_conversion_seconds")
        return "\n".join(out) + "\n"
