"""GPU telemetry from NVML (nvidia-ml-py, `import pynvml`), polled off the UI thread.

NVML is imported on first poll, not at start-up, and only in the worker thread. A box without
the package, the driver or a GPU gets a clear "no GPU" line and no further polling: a driver does
not appear while the console is open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual.message import Message
from textual.widget import Widget

POLL_SECONDS = 2.0


class NoGpu(Exception):
    """Why there is nothing to show; permanent for this process."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    util_pct: float | None
    mem_used_gb: float | None
    mem_total_gb: float | None
    temp_c: float | None
    power_w: float | None


class NvmlProbe:
    """Reads every GPU's utilisation, memory, temperature and power. Call from a worker thread."""

    def __init__(self) -> None:
        self._nvml: Any = None

    def _init(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise NoGpu("no nvidia-ml-py", "the nvidia-ml-py package is not installed") from None
            try:
                pynvml.nvmlInit()
            except Exception as exc:  # pynvml.NVMLError and friends: no driver, no device
                raise NoGpu("no driver", str(exc)) from None
            self._nvml = pynvml
        return self._nvml

    def __call__(self) -> list[GpuReading]:
        nvml = self._init()
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise NoGpu("none found", "NVML sees no NVIDIA GPU")
        readings = []
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            util = mem_used = mem_total = temp = power = None
            # Each sensor may be unsupported on a given board; one missing is not "no GPU".
            with contextlib.suppress(Exception):
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            with contextlib.suppress(Exception):
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                # GiB, as every other memory figure of the console (an H200: 139.8, not 150.1)
                mem_used, mem_total = info.used / 2**30, info.total / 2**30
            with contextlib.suppress(Exception):
                temp = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            with contextlib.suppress(Exception):
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            readings.append(GpuReading(i, name, util, mem_used, mem_total, temp, power))
        return readings


Probe = Callable[[], list[GpuReading]]


def _fmt(value: float | None, fmt: str, unit: str) -> str:
    return "–" if value is None else f"{value:{fmt}}{unit}"


class GpuPanel(Widget):
    """Utilisation, memory, temperature and power of the GPU a run uses, or why there is none."""

    class Reading(Message):
        def __init__(self, readings: list[GpuReading], error: str | None, detail: str = "") -> None:
            super().__init__()
            self.readings = readings
            self.error = error
            self.detail = detail

    COMPONENT_CLASSES: ClassVar[set[str]] = {"gpu-panel--label", "gpu-panel--none"}

    DEFAULT_CSS = """
    GpuPanel { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    GpuPanel > .gpu-panel--label { color: $text-muted; }
    GpuPanel > .gpu-panel--none { color: $text-muted; text-style: italic; }
    """

    def __init__(
        self, probe: Probe | None = None, *, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(id=id, classes=classes)
        self._probe: Probe = probe if probe is not None else NvmlProbe()
        self._readings: list[GpuReading] = []
        self._error: str | None = None
        self._device_index = 0
        self._started = False

    def on_mount(self) -> None:
        self._timer = self.set_interval(POLL_SECONDS, self._poll, pause=False)
        self.call_later(self._poll)

    def select_device(self, index: int) -> None:
        if index != self._device_index:
            self._device_index = index
            self.refresh()

    def _poll(self) -> None:
        self.run_worker(self._read, thread=True, exclusive=True, group="gpu", exit_on_error=False)

    def _read(self) -> None:
        try:
            self.post_message(self.Reading(self._probe(), None))
        except NoGpu as exc:
            self.post_message(self.Reading([], exc.reason, exc.detail))
        except Exception as exc:
            self.post_message(self.Reading([], f"telemetry failed: {exc}"))

    def on_gpu_panel_reading(self, message: Reading) -> None:
        message.stop()
        self._readings, self._error = message.readings, message.error
        if message.error is not None:
            self._timer.stop()  # permanent: see the module docstring
            self.tooltip = message.detail or message.error
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:  # type: ignore[override]
        return 1 if self._error is not None or not self._readings else 2

    def render(self) -> Text:
        label = self.get_component_rich_style("gpu-panel--label")
        if self._error is not None:
            line = Text.assemble(
                ("GPU        ", label),
                (f"no GPU ({self._error})", self.get_component_rich_style("gpu-panel--none")),
            )
            line.no_wrap, line.overflow = True, "ellipsis"
            return line
        if not self._readings:
            return Text.assemble(("GPU        ", label), "…")
        g = next((r for r in self._readings if r.index == self._device_index), self._readings[0])
        first = Text.assemble(
            ("GPU        ", label),
            f"{_fmt(g.util_pct, '.0f', '%')}  {_fmt(g.temp_c, '.0f', '°C')}  {_fmt(g.power_w, '.0f', ' W')}",
        )
        mem = "–"
        if g.mem_used_gb is not None and g.mem_total_gb:
            mem = f"{g.mem_used_gb:.1f} / {g.mem_total_gb:.1f} GiB"
        second = Text.assemble(("GPU mem    ", label), mem)
        out = Text("\n").join([first, second])
        out.no_wrap, out.overflow = True, "ellipsis"
        return out
