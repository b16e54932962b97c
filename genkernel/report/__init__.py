"""Reports of a user's own run, from a saved analyzer state (or the analyzer itself).

- :func:`summarize` / :func:`format_summary`: the numbers of any saved ledger, tracker, analyzer or
  trainer checkpoint (residual, shares with κ, traffic, top groups per probe, measured minus
  control, claims), strict-JSON ready; ``genkernel summarize STATE.pt`` prints them.
- :func:`render_report` / :func:`write_report`: one self-contained HTML page with the figures
  embedded (PNG, and a GIF of the noise×noise or coupling matrix over the run where snapshots
  exist), the numbers and claims beside them and the settings; ``genkernel report STATE.pt -o
  report.html`` writes it.
- :func:`~genkernel.report.browser.inspect_page`: what headless Chromium shows of a page (images,
  console errors, a screenshot); the tests use it.

No figure here goes through pyplot: nothing chooses a matplotlib backend.
"""

from .html import render_report, write_report
from .summary import find_states, format_summary, kind_of, read_state, summarize, summarize_state

__all__ = ["find_states", "format_summary", "kind_of", "read_state", "render_report", "summarize", "summarize_state",
           "write_report"]
