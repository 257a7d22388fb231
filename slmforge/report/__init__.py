"""The self-contained HTML run report (`runs/<name>/report.html`), written by the eval stage and by `slmforge report`."""

from slmforge.report.html import render, write_report

__all__ = ["render", "write_report"]
