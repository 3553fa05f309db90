"""The service panel: every clinic-edge unit (a down one in red), the gateway's /readyz and vLLM's /health."""

from __future__ import annotations

from datetime import datetime

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from appliance.telemetry.health import short_age
from appliance.telemetry.parts import GatewayPart, UnitsPart, UnitStatus, VllmPart

__all__ = ["ServicesPanel", "render_endpoints"]

DOWN = "bold white on red"


def _unit_row(unit: UnitStatus, now: datetime) -> tuple[Text, ...]:
    style = "" if unit.healthy else DOWN
    state = unit.load_state if unit.load_state == "not-found" else (unit.sub_state or unit.active_state)
    mark = "✔" if unit.healthy else "✖"
    since = short_age(now - unit.since) if unit.since else "–"
    restarts = "–" if unit.restarts is None else str(unit.restarts)
    restart_style = style or ("yellow" if unit.restarts else "")
    return (
        Text(f"{mark} {unit.name.removeprefix('clinic-edge-')}", style=style or "green"),
        Text(state, style=style),
        Text(since, style=style),
        Text(restarts, style=restart_style),
        Text(unit.result or "–", style=style or ("red" if unit.result not in (None, "success") else "")),
    )


def render_endpoints(gateway: GatewayPart | None, vllm: VllmPart | None) -> RenderableType:
    """The gateway's readiness with its reasons, then each vLLM replica's /health."""
    lines: list[Text] = []
    if gateway is None:
        lines.append(Text("gateway: reading…", style="dim"))
    elif gateway.error:
        lines.append(Text.assemble(("Gateway ", "bold"), (" DOWN ", DOWN), f" {gateway.url}"))
        lines.append(Text(f"  {gateway.error}", style="red"))
    else:
        badge = (" ready ", "bold black on green") if gateway.ready else (" NOT READY ", DOWN)
        lines.append(Text.assemble(("Gateway ", "bold"), badge, f" {gateway.url}/readyz"))
        lines.extend(Text(f"  • {reason}", style="red") for reason in gateway.reasons)
        for upstream in gateway.upstreams:
            ok = upstream.get("healthy")
            reason = f" – {upstream['reason']}" if upstream.get("reason") else ""
            lines.append(
                Text(
                    f"  upstream {upstream.get('url', '?')}: {'ok' if ok else 'DOWN'}{reason}",
                    style="" if ok else "red",
                )
            )
    if vllm is not None and not vllm.error:
        for replica in vllm.replicas:
            if replica.healthy:
                lines.append(
                    Text.assemble(("vLLM ", "bold"), (" healthy ", "bold black on green"), f" {replica.url}/health")
                )
            else:
                lines.append(Text.assemble(("vLLM ", "bold"), (" DOWN ", DOWN), f" {replica.url}/health"))
                lines.append(Text(f"  {replica.error or 'unhealthy'}", style="red"))
    return Group(*lines)


class ServicesPanel(Vertical):
    """Units in a table (select one, press j for its journal), then the HTTP health checks."""

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Services"
        self.units: UnitsPart | None = None
        self.gateway: GatewayPart | None = None
        self.vllm: VllmPart | None = None

    def compose(self) -> ComposeResult:
        """The unit table, the systemd error line, and the endpoint checks."""
        table: DataTable[Text] = DataTable(id="units", cursor_type="row", zebra_stripes=False, show_cursor=True)
        # Fixed widths: the header stays aligned when rows are replaced, and the table fits half of 120 columns.
        for label, width in (("unit", 18), ("state", 12), ("since", 5), ("↻", 2), ("result", 9)):
            table.add_column(label, width=width)
        yield table
        yield Static("", id="units-error")
        yield Static(Text("reading…", style="dim"), id="endpoints")

    def selected_unit(self) -> str | None:
        """The unit under the table's cursor (the first one when there is no cursor yet)."""
        if self.units is None or not self.units.units:
            return None
        row = self.query_one("#units", DataTable).cursor_row
        return self.units.units[min(max(row, 0), len(self.units.units) - 1)].name

    def show_units(self, part: UnitsPart, now: datetime) -> None:
        """Refill the table, keeping the cursor where it was."""
        self.units = part
        table: DataTable[Text] = self.query_one("#units", DataTable)
        row = table.cursor_row
        table.clear()
        for unit in part.units:
            table.add_row(*_unit_row(unit, now), key=unit.name)
        if part.units:
            table.move_cursor(row=min(max(row, 0), len(part.units) - 1), animate=False)
        error = Text(f"✖ {part.error}", style=DOWN) if part.error else Text("")
        self.query_one("#units-error", Static).update(error)
        self.query_one("#units-error", Static).display = bool(part.error)

    def show_endpoints(self, gateway: GatewayPart | None = None, vllm: VllmPart | None = None) -> None:
        """Redraw the HTTP checks with whichever part arrived."""
        self.gateway = gateway or self.gateway
        self.vllm = vllm or self.vllm
        self.query_one("#endpoints", Static).update(render_endpoints(self.gateway, self.vllm))
